"""compare's generation sections and near-tie flips: a greedy token that differs from HF's only where HF's own logits
nearly tie is rounding, not a fault (random weights at a real vocabulary in bf16 flip such tokens on an H200); a
token picked against a clear margin stays a failure."""

import torch

from parity.granite.pipeline import _near_tie_flips

VOCAB = 8


def _run(tokens, logits):
    return torch.tensor(tokens), [torch.tensor(step, dtype=torch.float32) for step in logits]


def _logits(best, second, gap, noise=0.0):
    """[2, VOCAB] logits: row 0 prefers `best` over `second` by `gap`; row 1 is a clear win for token 0."""
    rows = torch.zeros(2, VOCAB)
    rows[0, best], rows[0, second] = 1.0, 1.0 - gap
    rows[1, 0] = 5.0
    return (rows + noise).tolist()


def test_a_flip_inside_the_rounding_of_its_step_is_a_near_tie():
    hf = _run([[3, 4], [0, 0]], [_logits(3, 5, 0.002), _logits(4, 6, 0.5)])
    # FMS's logits differ by up to 0.0015 per entry: token 5 can win over 3 (margin 0.002 <= 2 x 0.0015)
    fms_logits = torch.tensor(_logits(3, 5, 0.002))
    fms_logits[0, 3] -= 0.0015
    fms_logits[0, 5] += 0.0015
    fms = ([[5, 1], [0, 0]], [fms_logits.tolist(), _logits(1, 2, 0.5)])
    ties = _near_tie_flips(hf, _run(*fms), torch.float32)
    assert list(ties) == [0]
    assert ties[0]["step"] == 0 and ties[0]["hf_token"] == 3 and ties[0]["fms_token"] == 5
    assert abs(ties[0]["hf_logit_margin"] - 0.002) < 1e-6 and abs(ties[0]["bound"] - 0.003) < 1e-6


def test_a_flip_against_a_clear_margin_is_not_a_tie():
    hf = _run([[3], [0]], [_logits(3, 5, 0.5)])
    fms = _run([[5], [0]], [_logits(3, 5, 0.5, noise=0.001)])  # same logits, yet the runner-up was picked
    assert _near_tie_flips(hf, fms, torch.float32) == {}


def test_only_a_rows_first_difference_can_be_a_tie():
    # row 0 parts from HF at step 0 by a clear margin; its step-1 flip (a tie) must not excuse it
    hf = _run([[3, 4], [0, 0]], [_logits(3, 5, 0.5), _logits(4, 6, 0.0)])
    fms = _run([[5, 6], [0, 0]], [_logits(3, 5, 0.5), _logits(4, 6, 0.0)])
    assert _near_tie_flips(hf, fms, torch.float32) == {}


def test_a_side_that_raised_has_no_ties():
    hf = _run([[3], [0]], [_logits(3, 5, 0.0)])
    assert _near_tie_flips(hf, RuntimeError("boom"), torch.float32) == {}
