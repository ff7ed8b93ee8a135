"""Model-side code: loading, hooked generation, activation capture, concept services."""
