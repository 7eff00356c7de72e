"""Per-step sample streams over MDS shards, with an exact data position.

Each rank reads exactly `global_batch / world` samples per optimizer step from a
`streaming.StreamingDataset` in its deterministic order, so the position after step k is
exactly k * global_batch samples into the epoch, and a resumed run continues where the
interrupted one stopped.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastross.data.schema import read_meta


@dataclass
class Position:
    epoch: int = 0  # epochs finished
    step_in_epoch: int = 0  # optimizer steps taken in the current epoch

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}


class StepStream:
    def __init__(self, shards: str, global_batch: int, world: int, shuffle: bool, seed: int):
        from streaming import StreamingDataset

        if global_batch % world:
            raise ValueError(f"data.global_batch={global_batch} is not divisible by the {world} ranks")
        self.meta = read_meta(shards)
        self.global_batch = global_batch
        self.per_rank = global_batch // world
        self.ds = StreamingDataset(
            local=shards, shuffle=shuffle, shuffle_seed=seed, batch_size=self.per_rank, replication=None
        )
        self.steps_per_epoch = self.ds.num_samples // global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{shards} holds {self.ds.num_samples} samples, fewer than data.global_batch={global_batch}"
            )
        self.position = Position()
        self._it = None

    def state_dict(self) -> dict:
        return self.position.to_dict()

    def load_state_dict(self, state: dict) -> None:
        self.position = Position(**state)
        self._it = None

    def _start(self) -> None:
        pos = self.position
        self.ds.load_state_dict(
            {
                "epoch": pos.epoch,
                "sample_in_epoch": pos.step_in_epoch * self.global_batch,
                "num_canonical_nodes": self.ds.num_canonical_nodes or 1,
                "shuffle_seed": self.ds.shuffle_seed,
                "initial_physical_nodes": None,
            }
        )
        self.ds.next_epoch = pos.epoch
        self._it = iter(self.ds)

    def next_step(self) -> list[dict]:
        """This rank's samples for the next optimizer step."""
        if self.position.step_in_epoch == self.steps_per_epoch:
            self.position = Position(self.position.epoch + 1, 0)
            self._it = None
        if self._it is None:
            self._start()
        samples = [next(self._it) for _ in range(self.per_rank)]
        self.position.step_in_epoch += 1
        return samples
