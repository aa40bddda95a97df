"""Layer map parsing and checks."""

import pytest

from fcd_ds.errors import UsageError
from fcd_ds.layer_map import LayerPair, layer_map_to_str, parse_layer_map


def test_uniform_pairs_each_student_block_with_the_end_of_its_teacher_segment():
    pairs = parse_layer_map("uniform", 10, 30)
    assert [(p.student, p.teacher) for p in pairs] == [(i, 3 * i + 2) for i in range(10)]
    assert [(p.student, p.teacher) for p in parse_layer_map("uniform", 2, 4)] == [(0, 1), (1, 3)]
    assert [(p.student, p.teacher) for p in parse_layer_map("uniform", 3, 3)] == [(0, 0), (1, 1), (2, 2)]


def test_pruned_pairs_each_student_block_with_the_block_it_was_copied_from():
    from fcd_ds.models import kept_teacher_blocks

    kept = kept_teacher_blocks(30, 10)
    assert kept == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert [(p.student, p.teacher) for p in parse_layer_map("pruned", 10, 30, kept)] == list(enumerate(kept))
    with pytest.raises(UsageError, match="--minilm_layer_map pruned: the student is not depth-pruned"):
        parse_layer_map("pruned", 10, 30, None, flag="--minilm_layer_map")


def test_last_and_explicit_pairs_with_weights():
    assert parse_layer_map("last", 4, 12) == [LayerPair(3, 11)]
    pairs = parse_layer_map("3:11@2, 0:2", 4, 12)
    assert pairs == [LayerPair(0, 2, 1.0), LayerPair(3, 11, 2.0)]
    assert parse_layer_map(layer_map_to_str(pairs), 4, 12) == pairs
    assert pairs[1].name == "s3_t11"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("0:12", "teacher block 12 does not exist"),
        ("4:1", "student block 4 does not exist"),
        ("-1:1", "student block -1 does not exist"),
        ("0-1", "cannot read"),
        ("0:1@x", "cannot read"),
        ("0:1,0:2", "appears twice"),
        ("0:1@-1", "negative"),
        ("0:1@0", "all pair weights are 0"),
        ("", "empty"),
    ],
)
def test_bad_layer_maps_name_the_flag(spec, message):
    with pytest.raises(UsageError, match=message) as err:
        parse_layer_map(spec, 4, 12)
    assert str(err.value).startswith("--layer_map")
    assert "\n" not in str(err.value)


def test_uniform_needs_a_shallower_student():
    with pytest.raises(UsageError, match="more blocks"):
        parse_layer_map("uniform", 6, 4)
