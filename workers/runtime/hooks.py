"""Probe and steering hooks, attached only for the duration of a `with` block.

Monitoring hooks are read-only (they return None, so TransformerLens leaves the activation
untouched); steering hooks return a modified residual. Steering is registered before capture at
the same layer, so what is recorded is what actually flowed on to the next block.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from probes.steering import Steering, apply_steering


@dataclass
class PositionTracker:
    """Absolute position of the first token in the forward pass about to run.

    The generation loop sets it before each pass, so a steering hook can tell prompt positions
    from generated ones under a KV cache (where a decode step sees a single position).
    """

    offset: int = 0


class ResidualCapture:
    """Collects `hook_resid_post` chunks per layer across the passes of one request."""

    def __init__(self, layers: Sequence[int]):
        self.layers = list(layers)
        self._chunks: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layers}

    def hook_for(self, layer: int):
        chunks = self._chunks[layer]

        def capture(resid: torch.Tensor, hook) -> None:  # resid: [batch, pos, d_model]
            chunks.append(resid.detach())

        return capture

    def clear(self) -> None:
        for chunks in self._chunks.values():
            chunks.clear()

    def stacked(self) -> torch.Tensor:
        """-> [n_layers, batch, total_pos, d_model] (passes concatenated along positions)."""
        return torch.stack([torch.cat(self._chunks[layer], dim=1) for layer in self.layers])


class StopForward(Exception):
    """Raised by the hook after the deepest layer a read needs: the blocks above it, the final
    norm and the unembedding would compute nothing anyone reads. `hooked` swallows it."""


def _stop(resid: torch.Tensor, hook) -> None:
    raise StopForward


def steering_hook(steering: Steering, tracker: PositionTracker):
    def steer(resid: torch.Tensor, hook) -> torch.Tensor:
        return apply_steering(resid, steering, tracker.offset)

    return steer


@contextmanager
def hooked(
    model,
    capture: ResidualCapture | None = None,
    steering: Sequence[Steering] = (),
    tracker: PositionTracker | None = None,
    stop_after: int | None = None,
) -> Iterator[PositionTracker]:
    """Attach steering then capture hooks; all are removed on exit, also when the body raises.

    `stop_after`: end the forward pass once this layer's residual has been read (and captured),
    for reads that need no logits. The forward call then never returns: the rest of the `with`
    body is skipped, so make the forward call its last statement."""
    tracker = tracker or PositionTracker()
    fwd_hooks = [(model.hook_name(s.layer), steering_hook(s, tracker)) for s in steering]
    if capture is not None:
        fwd_hooks += [(model.hook_name(layer), capture.hook_for(layer)) for layer in capture.layers]
    if stop_after is not None:
        fwd_hooks.append((model.hook_name(stop_after), _stop))  # after the capture at that layer
    # bridge.hooks removes exactly the hooks it added in its own `finally`.
    with model.bridge.hooks(fwd_hooks=fwd_hooks):
        try:
            yield tracker
        except StopForward:
            pass


def live_hook_count(model) -> int:
    """Forward hooks currently registered on any hook point (0 between requests)."""
    points = {id(point): point for point in model.bridge.hook_points()}  # aliases share points
    return sum(len(point._forward_hooks) for point in points.values())
