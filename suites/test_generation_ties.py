"""Near-tie flips in compare's generation sections: a greedy token that differs from HF's only where HF's own logits
nearly tie, within a few times HF's own 16-bit rounding error at that step and row (HF against HF in float64), is
rounding, not a fault; the bound comes from the reference alone, so a worse candidate excuses nothing more. A flip
against a wider margin, a flip in float32, or one at a step whose float64 logits were not measured fails."""

import pytest
import torch

from parity.diff import NEAR_TIE_FACTOR, near_tie_flips

pytestmark = pytest.mark.runs_at("no-model", device="cpu", dtype="float32")  # the near-tie rule on hand-made logits

VOCAB = 8


def _tokens(rows):
    return torch.tensor(rows)


def _logits(best, second, gap, noise=0.0):
    """[2, VOCAB] logits: row 0 prefers `best` over `second` by `gap`; row 1 is a clear win for token 0."""
    rows = torch.zeros(2, VOCAB)
    rows[0, best], rows[0, second] = 1.0, 1.0 - gap
    rows[1, 0] = 5.0
    return rows + noise


def _hf64(logits, rounding):
    """HF's float64 logits: HF's 16-bit ones moved by `rounding` at one entry of every row."""
    moved = logits.double().clone()
    moved[:, 7] += rounding
    return moved


def test_a_flip_inside_hfs_own_rounding_is_a_near_tie():
    hf_logits = [_logits(3, 5, 0.002)]
    ties = near_tie_flips(_tokens([[3], [0]]), hf_logits, _tokens([[5], [0]]), {0: _hf64(hf_logits[0], 0.001)},
                          "bfloat16")
    assert list(ties) == [0]
    assert ties[0]["step"] == 0 and ties[0]["hf_token"] == 3 and ties[0]["fms_token"] == 5
    # the bound is NEAR_TIE_FACTOR x HF's rounding in that row: max(0.001, one bf16 ulp at |1.0| = 2**-7)
    assert abs(ties[0]["bound"] - NEAR_TIE_FACTOR * 2 ** -7) < 1e-12 and abs(ties[0]["hf_logit_margin"] - 0.002) < 1e-6


def test_the_bound_ignores_how_far_the_candidates_logits_are():
    """The old rule took twice the step's largest FMS-vs-HF difference: a candidate off by 1.0 everywhere excused a
    margin of 0.5. The reference alone decides now."""
    hf_logits = [_logits(3, 5, 0.5)]
    assert near_tie_flips(_tokens([[3], [0]]), hf_logits, _tokens([[5], [0]]), {0: _hf64(hf_logits[0], 0.001)},
                          "bfloat16") == {}


def test_no_excuse_in_float32_or_without_a_measured_floor():
    hf_logits = [_logits(3, 5, 0.0)]
    flipped = (_tokens([[3], [0]]), hf_logits, _tokens([[5], [0]]))
    assert near_tie_flips(*flipped, {0: _hf64(hf_logits[0], 0.01)}, "float32") == {}
    assert near_tie_flips(*flipped, {}, "bfloat16") == {}


def test_only_a_rows_first_difference_can_be_a_tie():
    # row 0 parts from HF at step 0 by a clear margin; its step-1 flip (a tie) must not excuse it
    hf_logits = [_logits(3, 5, 0.5), _logits(4, 6, 0.0)]
    floors = {k: _hf64(v, 0.001) for k, v in enumerate(hf_logits)}
    assert near_tie_flips(_tokens([[3, 4], [0, 0]]), hf_logits, _tokens([[5, 6], [0, 0]]), floors, "bfloat16") == {}


# ------------------------------------------------------------------ rows that end apart (compare's padded batch)
def test_stop_token_ends_every_row_at_a_different_step():
    from parity.granite.generation import pick_stop_token

    # 5 ends the rows at steps 0, 1, 2 (all end, all apart); 7 ends two rows; 1 ends two rows
    assert pick_stop_token(_tokens([[5, 7, 9], [7, 5, 1], [1, 1, 5]])) == (5, [0, 1, 2])


def test_stop_token_prefers_every_row_ending_then_the_latest_end():
    from parity.granite.generation import pick_stop_token

    # 4 ends rows 0 and 1 apart while row 2 runs on; 1 ends every row (at 1, 0, 0): every row ending wins
    assert pick_stop_token(_tokens([[4, 1, 1], [1, 4, 1], [1, 1, 2]])) == (1, [1, 0, 0])
    # 5 ends at (0, 2), 3 at (1, 0), 6 at (2, 1): 5 and 6 reach step 2 (the tie goes to the smaller id); without
    # 5, 6 beats 3, whose latest end is earlier
    rows = _tokens([[5, 3, 6], [3, 6, 5]])
    assert pick_stop_token(rows) == (5, [0, 2])
    assert pick_stop_token(rows, exclude=(5,)) == (6, [2, 1])


def test_no_stop_token_when_no_token_ends_two_rows_apart():
    from parity.granite.generation import pick_stop_token

    assert pick_stop_token(_tokens([[1, 2], [1, 3]])) is None  # 1 ends both rows at step 0, 2 and 3 one row each
    assert pick_stop_token(_tokens([[1, 2], [2, 1]]), exclude=(1, 2)) is None
    assert pick_stop_token(_tokens([[1, 2, 3]])) is None  # one row cannot end apart from another


def test_end_of_text_is_kept_where_it_already_ends_the_rows_apart():
    from types import SimpleNamespace

    from parity.granite.generation import Ending, ending_apart

    tokenizer = SimpleNamespace(eos_token_id=9, pad_token_id=0)
    ending, extra = ending_apart(_tokens([[4, 9, 0], [9, 0, 0], [4, 4, 5]]), tokenizer, "greedy")
    assert ending == Ending(9, 0) and extra["rows_end"]["hf_end_steps"] == [1, 0, None]
    ending, extra = ending_apart(_tokens([[4, 5, 6], [6, 5, 4]]), tokenizer, "greedy")  # 4 and 6 end apart; 4 first
    assert ending == Ending(4, 0) and extra["rows_end"]["hf_end_steps"] == [0, 2]
    ending, extra = ending_apart(_tokens([[4, 4], [4, 4]]), tokenizer, "transcribe")
    assert ending is None and extra["not_run"][0]["cause"] == "inputs"
