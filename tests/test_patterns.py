import pytest

from quantization_wrapper.patterns import best_match, match_rank, matches, validate_pattern

NAME = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("pattern,expected", [
    ("model.layers.0.self_attn.q_proj", True),  # exact
    ("model.layers.0", True),  # submodule prefix
    ("q_proj", True),  # last name
    ("self_attn.q_proj", True),  # trailing path
    ("layers.0", True),  # middle path
    ("layers.1", False),
    ("layers.0.self", False),  # parts compare whole
    ("proj", False),
    ("*.q_proj", True),  # glob
    ("model.layers.*.self_attn.*", True),
    ("*.k_proj", False),
    ("re:.*\\.(q|k)_proj", True),  # regex, full match
    ("re:q_proj", False),
])
def test_matching_rules(pattern, expected):
    assert matches(pattern, NAME) is expected


def test_layers_1_does_not_match_layers_10():
    assert not matches("layers.1", "model.layers.10.mlp")
    assert matches("layers.10", "model.layers.10.mlp")


def test_most_specific_wins():
    patterns = ["re:.*", "*.q_proj", "q_proj", "model.layers.0", NAME]
    assert best_match(NAME, patterns) == NAME
    assert best_match(NAME, patterns[:-1]) == "model.layers.0"  # 3 parts beat 1
    assert best_match(NAME, patterns[:3]) == "q_proj"  # dotted beats glob
    assert best_match(NAME, patterns[:2]) == "*.q_proj"  # glob beats regex
    assert best_match("other", patterns[1:4]) is None
    assert match_rank("re:.*", NAME) < match_rank("*.q_proj", NAME) < match_rank("q_proj", NAME)


def test_bad_regex_is_a_clear_error():
    with pytest.raises(ValueError, match="skip_modules.*not a valid regular expression"):
        validate_pattern("re:(", "skip_modules")
    with pytest.raises(ValueError, match="non-empty"):
        validate_pattern("", "skip_modules")
