"""Length arithmetic of Granite Speech, from raw samples to the audio-token mask.

The single source of these formulas for the feature extractor, the processor, the model and the harness:

    raw samples N
      -> mel frames        N // hop_length + 1          (centered STFT)
      -> encoder frames    mel // 2                      (pairs of mel frames are stacked, an odd last one dropped)
      -> projector windows ceil(encoder / window_size)
      -> audio tokens      windows * (window_size // downsample_rate)
      -> input_features_mask [B, max tokens] bool, True where j < tokens[b]

Every function takes a python int or an integer torch tensor (elementwise) and uses only integer ops, so the model
can call them under torch.compile. Value checks run eagerly; while compiling, the data-dependent checks on tensor
values are skipped (they would need a host sync) and only the static checks remain.
"""

from typing import Optional, Sequence, Union

import torch

IntOrTensor = Union[int, torch.Tensor]

HOP_LENGTH = 160
N_FFT = 512
FRAME_STACK = 2  # mel frames stacked into one encoder frame (encoder input_dim = 2 * n_mels)
WINDOW_SIZE = 15
DOWNSAMPLE_RATE = 5


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a python int, got {type(value).__name__} ({value!r})")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _check_lengths(name: str, value: IntOrTensor) -> None:
    """Lengths are non-negative ints or integer tensors."""
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got dtype {value.dtype}")
        if not torch.compiler.is_compiling() and value.numel() > 0 and bool((value < 0).any()):
            raise ValueError(f"{name} must be >= 0, got {value.tolist()}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):  # SymInt: a shape under compile
        raise TypeError(f"{name} must be an int or an integer torch.Tensor, got {type(value).__name__} ({value!r})")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def tokens_per_window(window_size: int = WINDOW_SIZE, downsample_rate: int = DOWNSAMPLE_RATE) -> int:
    """Q-Former queries per projector window (window_size // downsample_rate); the window must split evenly."""
    _check_positive_int("window_size", window_size)
    _check_positive_int("downsample_rate", downsample_rate)
    if window_size % downsample_rate != 0:
        raise ValueError(
            f"window_size ({window_size}) must be a multiple of downsample_rate ({downsample_rate}): the projector "
            f"reshapes each window of {window_size} frames into {window_size}/{downsample_rate} query outputs"
        )
    return window_size // downsample_rate


def min_num_samples(n_fft: int = N_FFT) -> int:
    """Shortest clip the centered STFT accepts: reflect padding of n_fft // 2 needs more samples than that."""
    _check_positive_int("n_fft", n_fft)
    return n_fft // 2 + 1


def mel_frames(num_samples: IntOrTensor, hop_length: int = HOP_LENGTH) -> IntOrTensor:
    """Frames of a centered STFT (torchaudio MelSpectrogram, center=True)."""
    _check_lengths("num_samples", num_samples)
    _check_positive_int("hop_length", hop_length)
    return num_samples // hop_length + 1


def encoder_frames(num_mel_frames: IntOrTensor) -> IntOrTensor:
    """Encoder frames after stacking pairs of mel frames (an odd last mel frame is dropped)."""
    _check_lengths("num_mel_frames", num_mel_frames)
    return num_mel_frames // FRAME_STACK


def projector_windows(num_encoder_frames: IntOrTensor, window_size: int = WINDOW_SIZE) -> IntOrTensor:
    """Projector windows: the encoder output is zero-padded to a whole number of windows."""
    _check_lengths("num_encoder_frames", num_encoder_frames)
    _check_positive_int("window_size", window_size)
    return (num_encoder_frames + window_size - 1) // window_size  # ceil, exact in integers


def audio_tokens(
    num_windows: IntOrTensor, window_size: int = WINDOW_SIZE, downsample_rate: int = DOWNSAMPLE_RATE
) -> IntOrTensor:
    """Projector outputs (= <|audio|> tokens in the prompt) for a number of windows."""
    _check_lengths("num_windows", num_windows)
    return num_windows * tokens_per_window(window_size, downsample_rate)


def audio_tokens_from_encoder_frames(
    num_encoder_frames: IntOrTensor, window_size: int = WINDOW_SIZE, downsample_rate: int = DOWNSAMPLE_RATE
) -> IntOrTensor:
    return audio_tokens(projector_windows(num_encoder_frames, window_size), window_size, downsample_rate)


def audio_tokens_from_samples(
    num_samples: IntOrTensor,
    hop_length: int = HOP_LENGTH,
    window_size: int = WINDOW_SIZE,
    downsample_rate: int = DOWNSAMPLE_RATE,
) -> IntOrTensor:
    """Raw samples -> audio tokens (HF `_get_num_audio_features` for one clip)."""
    num_encoder_frames = encoder_frames(mel_frames(num_samples, hop_length))
    return audio_tokens_from_encoder_frames(num_encoder_frames, window_size, downsample_rate)


def input_features_mask(
    token_counts: Union[Sequence[int], torch.Tensor], max_tokens: Optional[IntOrTensor] = None
) -> torch.Tensor:
    """Bool mask [B, max_tokens] over projector outputs, True where j < token_counts[b].

    max_tokens defaults to max(token_counts). Under torch.compile pass it from a shape (e.g.
    audio_tokens_from_encoder_frames(input_features.shape[1])) so no host sync is needed.
    """
    if isinstance(token_counts, torch.Tensor):
        counts = token_counts
    else:
        if isinstance(token_counts, (str, bytes)) or not isinstance(token_counts, Sequence):
            raise TypeError(
                f"token_counts must be a sequence of ints or a 1-D integer tensor, got {type(token_counts).__name__}"
            )
        for count in token_counts:
            _check_lengths("token_counts[i]", count)
        counts = torch.tensor(list(token_counts), dtype=torch.long)
    _check_lengths("token_counts", counts)
    if counts.ndim != 1 or counts.shape[0] == 0:
        raise ValueError(f"token_counts must be 1-D with at least one clip, got shape {tuple(counts.shape)}")
    if max_tokens is None:
        max_tokens = int(counts.max())
    else:
        _check_lengths("max_tokens", max_tokens)
        if not torch.compiler.is_compiling() and bool((counts > max_tokens).any()):
            raise ValueError(
                f"max_tokens ({max_tokens}) is smaller than the largest token count ({counts.max().tolist()})"
            )
    positions = torch.arange(max_tokens, device=counts.device)
    return positions.view(1, -1) < counts.view(-1, 1)
