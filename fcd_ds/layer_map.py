"""Layer map: which student block is matched with which teacher block, as data.

Block indices are 0-based positions in the model's list of transformer blocks (``model.layers`` for
Llama, ``transformer.h`` for GPT-2); the feature is the block's output hidden state (before any final
norm). Like TextBrewer's ``intermediate_matches`` (``layer_S``, ``layer_T``, ``weight``), but parsed from
one flag:

* ``uniform``: student block i <-> teacher block ``round((i + 1) * L_t / L_s) - 1``; every student block,
  the last one paired with the teacher's last one.
* ``last``: only the last block of each model.
* ``pruned``: for a depth-pruned student, each student block i with the teacher block it was copied
  from (``kept_teacher_blocks``), so that every pair starts from identical weights.
* an explicit list ``"s:t[@w],..."``, e.g. ``"4:14,9:29@2"`` (weight w, default 1).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UsageError

__all__ = ["LayerPair", "parse_layer_map", "layer_map_to_str"]


@dataclass(frozen=True)
class LayerPair:
    """One matched pair of transformer blocks (0-based) and the pair's weight in the FCD term."""

    student: int
    teacher: int
    weight: float = 1.0

    @property
    def name(self) -> str:
        """Stable tag for logs, e.g. ``s9_t29``."""
        return f"s{self.student}_t{self.teacher}"


def _uniform(n_student: int, n_teacher: int) -> list[LayerPair]:
    return [LayerPair(i, round((i + 1) * n_teacher / n_student) - 1) for i in range(n_student)]


def _parse_pair(item: str, flag: str) -> LayerPair:
    try:
        pair, _, weight = item.partition("@")
        s, t = pair.split(":")
        return LayerPair(int(s), int(t), float(weight) if weight else 1.0)
    except ValueError:
        raise UsageError(
            f"{flag}: cannot read {item!r}; use 'uniform', 'last', 'pruned' or pairs like '0:2,1:5@0.5' "
            "(student:teacher[@weight], 0-based block indices)"
        ) from None


def parse_layer_map(spec: str, n_student: int, n_teacher: int, pruned_from: list[int] | None = None, *, flag: str = "--layer_map") -> list[LayerPair]:
    """Parse and check a layer map against the two models' block counts.

    Args:
        spec: ``"uniform"``, ``"last"``, ``"pruned"`` or ``"s:t[@w],..."``.
        n_student: number of student transformer blocks. n_teacher: number of teacher blocks.
        pruned_from: the teacher block each student block was copied from (a depth-pruned student),
            else None. flag: the command-line flag named in errors.

    Returns:
        Pairs sorted by student block.

    Raises:
        UsageError: unreadable spec, an index out of range, a student block listed twice, a negative
            weight, all weights zero, or ``pruned`` for a student that is not depth-pruned.
    """
    spec = spec.strip()
    if spec == "pruned":
        if pruned_from is None:
            raise UsageError(f"{flag} pruned: the student is not depth-pruned from the teacher (--student_num_layers); use 'uniform' or explicit pairs")
        return [LayerPair(i, t) for i, t in enumerate(pruned_from)]
    if spec == "uniform":
        if n_student > n_teacher:
            raise UsageError(
                f"{flag} uniform: the student has more blocks ({n_student}) than the teacher "
                f"({n_teacher}); pass explicit pairs like '0:0,1:1'"
            )
        return _uniform(n_student, n_teacher)
    if spec == "last":
        return [LayerPair(n_student - 1, n_teacher - 1)]
    pairs = [_parse_pair(item.strip(), flag) for item in spec.split(",") if item.strip()]
    if not pairs:
        raise UsageError(f"{flag}: empty; use 'uniform', 'last' or pairs like '0:2,1:5'")
    for p in pairs:
        if not 0 <= p.student < n_student:
            raise UsageError(
                f"{flag}: student block {p.student} does not exist (the student has {n_student} "
                f"blocks, 0-{n_student - 1})"
            )
        if not 0 <= p.teacher < n_teacher:
            raise UsageError(
                f"{flag}: teacher block {p.teacher} does not exist (the teacher has {n_teacher} "
                f"blocks, 0-{n_teacher - 1})"
            )
        if p.weight < 0:
            raise UsageError(f"{flag}: weight of pair {p.student}:{p.teacher} is negative; use >= 0")
    students = [p.student for p in pairs]
    if len(set(students)) != len(students):
        raise UsageError(f"{flag}: a student block appears twice; give each student block one teacher block")
    if sum(p.weight for p in pairs) == 0:
        raise UsageError(f"{flag}: all pair weights are 0; give a pair a weight > 0")
    return sorted(pairs, key=lambda p: p.student)


def layer_map_to_str(pairs: list[LayerPair]) -> str:
    """Inverse of :func:`parse_layer_map` for explicit pairs: ``"0:2@1.0,1:5@1.0"``."""
    return ",".join(f"{p.student}:{p.teacher}@{p.weight:g}" for p in pairs)
