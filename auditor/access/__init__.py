"""Who may do what: API tokens and their scopes, and the append-only log of admin actions."""
