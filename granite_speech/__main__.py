"""`python -m granite_speech transcribe --checkpoint DIR clip.flac ...`: feature extraction -> FMS generate -> decode."""

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import torch

DEFAULT_PROMPT = "<|audio|>can you transcribe the speech into a written format?"


def build_prompt(tokenizer, instruction: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
        )
    return instruction


def transcribe(
    checkpoint: Path,
    clips: Sequence[Path],
    *,
    instruction: str = DEFAULT_PROMPT,
    max_new_tokens: int = 64,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> List[str]:
    from fms.utils.generation import generate

    from granite_speech.model import padding_attn_kwargs
    from granite_speech.processor import GraniteSpeechProcessor
    from granite_speech.audio import read_audio
    from granite_speech.checkpoint import load_model

    processor = GraniteSpeechProcessor.from_pretrained(checkpoint)
    model = load_model(checkpoint, dtype=dtype, device=device)
    audio = [read_audio(Path(c), processor.feature_extractor.sampling_rate) for c in clips]
    prompt = build_prompt(processor.tokenizer, instruction)
    inputs = processor([prompt] * len(audio), audio, padding_side="left")
    input_ids = inputs["input_ids"].to(device)
    attn = padding_attn_kwargs(inputs["attention_mask"].to(device), dtype=dtype)
    with torch.no_grad():
        output = generate(
            model,
            input_ids,
            max_seq_len=input_ids.size(1) + max_new_tokens,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            eos_token_id=processor.tokenizer.eos_token_id,
            prepare_model_inputs_hook=model.prepare_inputs_for_generation,
            extra_kwargs={
                "input_features": inputs["input_features"].to(device),
                "input_features_mask": inputs["input_features_mask"].to(device),
                **attn,
            },
        )
    eos = processor.tokenizer.eos_token_id
    texts = []
    for row in output[:, input_ids.size(1) :].tolist():
        # FMS's generate keeps going for rows that already ended while others have not: cut at the first eos
        texts.append(processor.decode(row[: row.index(eos)] if eos in row else row, skip_special_tokens=True))
    return texts


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m granite_speech", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("transcribe", help="transcribe audio files with the FMS model")
    tr.add_argument("--checkpoint", required=True, type=Path, help="local HF checkpoint folder")
    tr.add_argument("clips", nargs="+", type=Path, help="audio files (flac/wav), mono")
    tr.add_argument("--prompt", default=DEFAULT_PROMPT, help="user instruction; must contain <|audio|>")
    tr.add_argument("--max-new-tokens", type=int, default=64)
    tr.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    tr.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args(argv)
    for clip in args.clips:
        if not clip.is_file():
            parser.error(f"no such audio file: {clip}")
    texts = transcribe(
        args.checkpoint,
        args.clips,
        instruction=args.prompt,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
        dtype=getattr(torch, args.dtype),
    )
    for clip, text in zip(args.clips, texts):
        print(f"{clip}\t{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
