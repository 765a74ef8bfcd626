"""`granite-speech transcribe --checkpoint DIR clip.flac ...` (also `python -m granite_speech transcribe`): feature
extraction -> FMS generate -> decode, one line `clip<TAB>transcript` per clip. A backslash, newline, carriage return
or tab inside a clip's name or transcript is written as \\\\, \\n, \\r or \\t (and file-name bytes that are not UTF-8
as \\xNN), so every clip stays one line.

Every family member, by the checkpoint's config.json: the LLM members (3.3, 4.0-1b, 4.1-2b, 4.1-2b-plus) generate
from the prompt; the CTC member (5.0-470m) has no prompt and no token budget: its features -> CTC logits -> greedy CTC
decoding (`ctc5.transcribe`).

Every input (checkpoint folder, audio files, prompt, device, dtype, token budget: at most the text model's
max_position_embeddings) is checked before the model loads;
a bad one exits 2 with one line `error: ...`. Clips are down-mixed to mono and resampled to the model's rate (said on
stderr). Rows of a batch end at their own eos, as with HF `generate`.
"""

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

import torch

from granite_speech.audio import DEFAULT_MAX_SECONDS, read_audio
from granite_speech.cli_errors import (
    ArgumentParser,
    UsageError,
    adapter_warning,
    check_device,
    check_dtype,
    check_feature_config,
    check_model_folder,
    check_prompt,
    exit_codes_epilog,
    one_line,
    positive_int,
    printable,
    positive_seconds,
    run_main,
    version_string,
)

PROG = "granite-speech"
DEFAULT_PROMPT = "<|audio|>can you transcribe the speech into a written format?"
DTYPES = ("float32", "bfloat16", "float16")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_prompt(tokenizer, instruction: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
        )
    return instruction


def _audio_settings(folder: Path) -> tuple:
    """(sampling rate, audio placeholder) from the folder's processor files (checked), without building the
    processor."""
    import json

    rate = check_feature_config(folder).sampling_rate
    token = "<|audio|>"
    processor_config = folder / "processor_config.json"
    if processor_config.is_file():
        token = json.loads(processor_config.read_text()).get("audio_token") or token
    return rate, token


def max_new_tokens_bound(folder: Path) -> int:
    """The most tokens `--max-new-tokens` may ask for: the text model's `max_position_embeddings` (the context it
    was trained for: 131072 for granite-speech-3.3, 4096 for 4.x). Each generated token costs output and KV-cache
    memory, so a larger budget is refused before the model loads rather than attempted (1e11 tokens would allocate
    hundreds of GB for the output ids alone)."""
    import json

    text = json.loads((folder / "config.json").read_text()).get("text_config") or {}
    limit = text.get("max_position_embeddings")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        from transformers import GraniteConfig

        limit = GraniteConfig().max_position_embeddings  # what HF reads when config.json leaves it out
    return limit


def escape_transcript(text: str) -> str:
    """One output field on one line: backslash, newline, carriage return and tab as \\\\, \\n, \\r, \\t (the
    escapes of PostgreSQL's COPY text format); bytes of a file name that are not UTF-8 as \\xNN."""
    text = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return printable(text)


CTC_MEMBER = "granite_speech5_ctc"
DECODERS = ("auto", "eager", "fast")


def _member(folder: Path) -> str:
    """config.json's model_type (a checked folder has one that loads)."""
    import json

    return json.loads((folder / "config.json").read_text()).get("model_type") or "granite_speech"


@dataclass
class TranscribeJob:
    """Checked inputs of one transcription: nothing here needs a model."""

    checkpoint: Path
    names: List[str]
    audio: List[torch.Tensor]
    instruction: str
    max_new_tokens: int
    device: torch.device
    dtype: torch.dtype
    member: str = "granite_speech"  # the HF model_type: granite_speech, granite_speech_plus, granite_speech5_ctc
    decoder: str = "eager"  # "eager" (FMS generate) or "fast" (static KV cache, CUDA graphs on CUDA)
    eos_token_id: Optional[int] = None  # where each row ends; None: the tokenizer's end-of-text


def check_transcribe_inputs(
    checkpoint: Union[str, Path],
    clips: Sequence[Union[str, Path]],
    *,
    instruction: str = DEFAULT_PROMPT,
    max_new_tokens: int = 64,
    device: Union[str, torch.device, None] = None,
    dtype: Union[str, torch.dtype] = torch.float32,
    max_audio_seconds: Optional[float] = DEFAULT_MAX_SECONDS,
    notify: Callable[[str], None] = _stderr,
    cli: bool = False,
    decoder: str = "auto",
) -> TranscribeJob:
    """Every check of a transcription, before any model loads; raises UsageError (AudioInputError for audio)."""
    opt = (lambda flag, name: flag) if cli else (lambda flag, name: name)
    dtype = check_dtype(dtype, opt("--dtype", "dtype"))
    device = check_device(device, dtype, opt("--device", "device"))
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UsageError(f"{opt('--max-new-tokens', 'max_new_tokens')} must be a whole number >= 1, got "
                         f"{max_new_tokens!r}")
    if decoder not in DECODERS:
        raise UsageError(f"{opt('--decoder', 'decoder')} must be one of {', '.join(DECODERS)}, got {decoder!r}")
    requested = decoder
    if decoder == "auto":  # the fast path where it pays: CUDA graphs over the decode step
        decoder = "fast" if device.type == "cuda" else "eager"
    if isinstance(clips, (str, Path)) or not clips:
        raise UsageError("no audio clips given; expected one or more audio files")
    folder = check_model_folder(checkpoint, opt("--checkpoint", "checkpoint"))
    member = _member(folder)
    rate, audio_token = _audio_settings(folder)
    if member != CTC_MEMBER:  # the CTC model takes no prompt and no token budget
        check_prompt(instruction, audio_token)
        bound = max_new_tokens_bound(folder)
        if max_new_tokens > bound:
            raise UsageError(f"{opt('--max-new-tokens', 'max_new_tokens')} {max_new_tokens} is over this model's "
                             f"context: expected at most {bound} (text_config.max_position_embeddings of "
                             f"{printable(folder / 'config.json')})")
    audio = [read_audio(Path(clip), rate, max_seconds=max_audio_seconds, notify=notify) for clip in clips]
    if member == CTC_MEMBER:
        if requested == "fast":
            raise UsageError(f"{opt('--decoder', 'decoder')} fast: {folder.name} is a CTC model (granite-speech-5.0); "
                             "its greedy decoding is one forward pass, with no decode loop to run fast")
        decoder = "eager"
    return TranscribeJob(folder, [str(c) for c in clips], audio, instruction, max_new_tokens, device, dtype, member,
                         decoder)


def _run_ctc_transcription(job: TranscribeJob, notify: Callable[[str], None]) -> List[str]:
    """5.0 (CTC only): the FMS feature extractor and processor, `get_model("hf_pretrained")`, greedy CTC decoding."""
    from fms.models import get_model

    import granite_speech  # noqa: F401  (registers every family member)
    from granite_speech import ctc5
    from granite_speech.checkpoint import CheckpointCoverageError
    from granite_speech.features5 import GraniteSpeech5Processor

    processor = GraniteSpeech5Processor.from_pretrained(job.checkpoint)
    try:
        model = get_model("hf_pretrained", model_path=str(job.checkpoint), device_type=job.device.type,
                          data_type=job.dtype).to(job.device).eval()
    except CheckpointCoverageError as err:
        raise UsageError(load_error(job.checkpoint, err)) from err
    texts = ctc5.transcribe(model, processor, job.audio, device=job.device)
    for name, text in zip(job.names, texts):
        if not text.strip():
            notify(f"warning: {name}: empty transcript (every frame decoded to the CTC blank); expected with random "
                   f"weights, otherwise check the audio")
    return texts


def run_transcription(job: TranscribeJob, notify: Callable[[str], None] = _stderr) -> List[str]:
    """Load the processor and the FMS model and transcribe the checked clips as one batch."""
    from granite_speech.checkpoint import CheckpointCoverageError, load_model
    from granite_speech.processor import GraniteSpeechProcessor

    if job.member == CTC_MEMBER:
        return _run_ctc_transcription(job, notify)
    warning = adapter_warning(job.checkpoint, "merged")
    if warning:
        notify(warning)
    processor = GraniteSpeechProcessor.from_pretrained(job.checkpoint)
    try:
        model = load_model(job.checkpoint, dtype=job.dtype, device=job.device)
    except CheckpointCoverageError as err:
        raise UsageError(load_error(job.checkpoint, err)) from err
    return transcribe_loaded(model, processor, job, notify)


def load_error(folder: Path, err: Exception) -> str:
    """The one line for a checkpoint the load refused: its values (NaN / Inf weights) or its fit to config.json."""
    from granite_speech.checkpoint.coverage import CheckpointValuesError

    if isinstance(err, CheckpointValuesError):
        return f"checkpoint {printable(folder)} holds weights that cannot be used: {one_line(err)}"
    return f"checkpoint {printable(folder)} does not fit its config.json: {one_line(err)}"


def transcribe_loaded(model, processor, job: TranscribeJob, notify: Callable[[str], None] = _stderr) -> List[str]:
    """The checked clips of `job` through a loaded model and processor: prompts from the chat template, one padded
    batch, greedy decoding with `job.decoder`, each row cut at its own end-of-text."""
    from granite_speech.fast_generate import generate_static
    from granite_speech.generation import generate_greedy
    from granite_speech.model import padding_attn_kwargs

    prompt = build_prompt(processor.tokenizer, job.instruction)
    inputs = processor([prompt] * len(job.audio), job.audio, padding_side="left")
    input_ids = inputs["input_ids"].to(job.device)
    eos = processor.tokenizer.eos_token_id if job.eos_token_id is None else job.eos_token_id
    features = inputs["input_features"].to(job.device, job.dtype)
    features_mask = inputs["input_features_mask"].to(job.device)
    attention_mask = inputs["attention_mask"].to(job.device)
    if job.decoder == "fast":
        output = generate_static(model, input_ids, features, features_mask, attention_mask,
                                 max_new_tokens=job.max_new_tokens, eos_token_id=eos,
                                 pad_token_id=processor.tokenizer.pad_token_id,
                                 use_cuda_graph=job.device.type == "cuda")
    else:
        output = generate_greedy(
            model,
            input_ids,
            max_new_tokens=job.max_new_tokens,
            eos_token_id=eos,
            pad_token_id=processor.tokenizer.pad_token_id,
            extra_kwargs={"input_features": features, "input_features_mask": features_mask,
                          **padding_attn_kwargs(attention_mask, dtype=job.dtype)},
        )
    texts = []
    for name, row in zip(job.names, output[:, input_ids.size(1):].tolist()):
        ended = eos in row
        text = processor.decode(row[: row.index(eos)] if ended else row, skip_special_tokens=True)
        if not text.strip():
            notify(f"warning: {name}: empty transcript (the model emitted {row.index(eos) if ended else len(row)} "
                   f"token(s) before end-of-text); expected with random or adapter-less weights, otherwise check the "
                   f"audio and --prompt")
        texts.append(text)
    return texts


def transcribe(
    checkpoint: Union[str, Path],
    clips: Sequence[Union[str, Path]],
    *,
    instruction: str = DEFAULT_PROMPT,
    max_new_tokens: int = 64,
    device: Union[str, torch.device] = "cpu",
    dtype: Union[str, torch.dtype] = torch.float32,
    max_audio_seconds: Optional[float] = DEFAULT_MAX_SECONDS,
    decoder: str = "auto",
) -> List[str]:
    """Transcripts of `clips` (audio file paths) with the FMS model of `checkpoint`, one per clip, decoded as one
    batch (`decoder`: "eager", "fast" or "auto" = fast on CUDA). Bad input raises UsageError (a ValueError;
    AudioInputError for audio files) before the model loads."""
    job = check_transcribe_inputs(checkpoint, clips, instruction=instruction, max_new_tokens=max_new_tokens,
                                  device=device, dtype=dtype, max_audio_seconds=max_audio_seconds, decoder=decoder)
    return run_transcription(job)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="IBM Granite Speech natively in IBM FMS.",
        epilog=exit_codes_epilog(ok=": every clip transcribed"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=version_string(PROG),
                        help="print the version of granite-speech-fms, torch, transformers and ibm-fms, and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    tr = sub.add_parser(
        "transcribe",
        help="transcribe audio files with the FMS model",
        description=__doc__,
        epilog=exit_codes_epilog(ok=": every clip transcribed"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tr.add_argument("--checkpoint", required=True, type=Path, metavar="DIR",
                    help="local Hugging Face Granite Speech folder: config.json, *.safetensors (never pickle), "
                         "adapter_config.json + adapter_model.safetensors, tokenizer, preprocessor_config.json")
    tr.add_argument("clips", nargs="+", type=Path, metavar="CLIP",
                    help="audio files (WAV, FLAC, OGG, MP3); multi-channel audio is down-mixed to mono and any "
                         "sampling rate resampled to the model's (16 kHz)")
    tr.add_argument("--prompt", default=DEFAULT_PROMPT, metavar="TEXT",
                    help="user instruction, with <|audio|> exactly once where the clip goes; the checkpoint's chat "
                         "template wraps it (default: %(default)r)")
    tr.add_argument("--max-new-tokens", type=positive_int, default=64, metavar="N",
                    help="at most N generated tokens per clip, each clip stopping at its own end-of-text; N is at "
                         "most the model's text_config.max_position_embeddings (default: %(default)s)")
    tr.add_argument("--device", default=None, metavar="DEVICE",
                    help="torch device: cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    tr.add_argument("--dtype", default="float32", choices=DTYPES,
                    help="weights and activations dtype (default: %(default)s)")
    tr.add_argument("--decoder", default="auto", choices=DECODERS,
                    help="greedy decoding loop: eager (FMS generate), fast (static KV cache, CUDA graphs on CUDA) "
                         "or auto: fast on CUDA, eager elsewhere (default: %(default)s)")
    tr.add_argument("--max-audio-seconds", type=positive_seconds, default=DEFAULT_MAX_SECONDS, metavar="S",
                    help="refuse clips longer than S seconds (default: %(default)g)")
    return parser


def _main(argv: Optional[Sequence[str]]) -> int:
    args = build_parser().parse_args(argv)
    job = check_transcribe_inputs(
        args.checkpoint, args.clips, instruction=args.prompt, max_new_tokens=args.max_new_tokens, device=args.device,
        dtype=args.dtype, max_audio_seconds=args.max_audio_seconds, cli=True, decoder=args.decoder,
    )
    texts = run_transcription(job)
    for name, text in zip(job.names, texts):
        print(f"{escape_transcript(name)}\t{escape_transcript(text)}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The `granite-speech` command: returns the exit code (0 done, 2 usage or input error, 3 internal error)."""
    return run_main(_main, argv, PROG)


if __name__ == "__main__":
    sys.exit(main())
