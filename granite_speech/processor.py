"""Prompt + audio -> model inputs, as HF's `GraniteSpeechProcessor` builds them.

Each `<|audio|>` placeholder, taken in order over all prompts, is expanded to as many copies as its clip has
projector outputs (`audio_embed_sizes`), then the prompts are tokenized together (padded, left or right).
"""

import json
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from granite_speech.features import PROCESSOR_CONFIG_NAME, GraniteSpeechFeatureExtractor

DEFAULT_AUDIO_TOKEN = "<|audio|>"


class GraniteSpeechProcessor:
    """Feature extractor + any HF tokenizer object that has the audio placeholder as one token.

    audio_token: the placeholder string; None takes `tokenizer.audio_token` if the tokenizer defines one (as HF
    does), else "<|audio|>".
    """

    def __init__(self, feature_extractor: GraniteSpeechFeatureExtractor, tokenizer, audio_token: Optional[str] = None):
        tokenizer_audio_token = getattr(tokenizer, "audio_token", None)
        if audio_token is None:
            audio_token = tokenizer_audio_token or DEFAULT_AUDIO_TOKEN
        elif tokenizer_audio_token is not None and tokenizer_audio_token != audio_token:
            raise ValueError(
                f"audio_token {audio_token!r} differs from the tokenizer's audio_token {tokenizer_audio_token!r}"
            )
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer
        self.audio_token = audio_token
        self.audio_token_id = _single_token_id(tokenizer, audio_token)

    @classmethod
    def from_pretrained(cls, folder: Union[str, Path], **tokenizer_kwargs) -> "GraniteSpeechProcessor":
        """Feature extractor json + tokenizer files of a checkpoint folder (local only, never the hub)."""
        from transformers import AutoTokenizer  # the tokenizer is HF's; only this constructor needs transformers

        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
        audio_token = None
        processor_config_path = folder / PROCESSOR_CONFIG_NAME
        if processor_config_path.is_file():
            audio_token = json.loads(processor_config_path.read_text()).get("audio_token")
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **tokenizer_kwargs)
        return cls(GraniteSpeechFeatureExtractor.from_pretrained(folder), tokenizer, audio_token=audio_token)

    def __call__(
        self,
        text: Union[str, Sequence[str]],
        audio=None,
        *,
        sampling_rate: Optional[int] = None,
        device: Optional[Union[str, torch.device]] = "cpu",
        padding: Union[bool, str] = True,
        padding_side: Optional[str] = None,
        return_tensors: Optional[str] = "pt",
        **tokenizer_kwargs,
    ) -> dict:
        """Returns the tokenizer's outputs (input_ids, attention_mask, ...) plus, with audio, input_features and
        input_features_mask. padding_side "left" is what batched generation needs."""
        prompts = _as_prompts(text)
        num_placeholders = sum(prompt.count(self.audio_token) for prompt in prompts)
        audio_inputs = {}
        expanded = prompts
        if audio is None:
            if num_placeholders:
                raise ValueError(
                    f"the prompts contain {num_placeholders} {self.audio_token} placeholders but no audio was given"
                )
        else:
            audio_inputs = self.feature_extractor(audio, sampling_rate=sampling_rate, device=device)
            sizes = audio_inputs.pop("audio_embed_sizes")
            if num_placeholders != len(sizes):
                raise ValueError(
                    f"the prompts contain {num_placeholders} {self.audio_token} placeholders but {len(sizes)} audio "
                    "clips were given; expected one placeholder per clip (a [B, N] tensor counts as B clips)"
                )
            expanded = self.expand_audio_placeholders(prompts, sizes)

        if padding_side is not None:
            tokenizer_kwargs["padding_side"] = padding_side
        text_inputs = self.tokenizer(expanded, padding=padding, return_tensors=return_tensors, **tokenizer_kwargs)
        self._check_audio_token_counts(expanded, text_inputs["input_ids"])
        return {**text_inputs, **audio_inputs}

    def expand_audio_placeholders(self, prompts: Sequence[str], audio_embed_sizes: Sequence[int]) -> list[str]:
        """Replace the k-th placeholder (over all prompts, in order) by audio_embed_sizes[k] copies of it."""
        sizes = iter(audio_embed_sizes)
        expanded = []
        for prompt in prompts:
            pieces = prompt.split(self.audio_token)
            out = [pieces[0]]
            for piece in pieces[1:]:
                out.append(self.audio_token * next(sizes))
                out.append(piece)
            expanded.append("".join(out))
        return expanded

    def _check_audio_token_counts(self, expanded: Sequence[str], input_ids) -> None:
        # catches truncation cutting audio tokens, which would misalign features and placeholders in the model
        expected = [prompt.count(self.audio_token) for prompt in expanded]
        found = [int((torch.as_tensor(ids) == self.audio_token_id).sum()) for ids in input_ids]
        if found != expected:
            raise ValueError(
                f"audio tokens per prompt after tokenization {found} differ from the expanded placeholders "
                f"{expected}; truncation (max_length) probably cut audio tokens: disable it or raise max_length"
            )

    def batch_decode(self, token_ids, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(token_ids, **kwargs)

    def decode(self, token_ids, **kwargs) -> str:
        return self.tokenizer.decode(token_ids, **kwargs)


def _as_prompts(text) -> list[str]:
    if isinstance(text, str):
        return [text]
    if isinstance(text, (list, tuple)) and text and all(isinstance(prompt, str) for prompt in text):
        return list(text)
    raise TypeError(f"text must be a string or a non-empty list of strings, got {type(text).__name__}: {text!r:.80}")


def _single_token_id(tokenizer, token: str) -> int:
    """The placeholder must be one token of its own, or the expansion would not give one id per audio feature."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    ids = tokenizer(token + token, add_special_tokens=False)["input_ids"]
    if token_id is None or token_id == tokenizer.unk_token_id or list(ids) != [token_id, token_id]:
        raise ValueError(
            f"audio token {token!r} is not a single token of the tokenizer (id {token_id}, {token!r}*2 encodes to "
            f"{list(ids)}); add it as a special token"
        )
    return token_id
