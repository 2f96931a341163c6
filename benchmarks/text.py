"""Text encoder throughput: chunks/s and notes/s with the real all-MiniLM-L6-v2.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/text.py [--repeats 3]

Chunks are built from a long synthetic progress note at 512 and 256 tokens (the latter is what
sentence-transformers runs MiniLM at); figures are medians over repeats, printed, never asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

from mmcds.encoders.text import TextEncoder, chunk_note
from mmcds.records import Note

SENTENCES = [
    "Patient reports productive cough with yellow sputum and T max 38.6 °C overnight.",
    "SpO₂ 91% on room air, improved to 95% on 2 L nasal cannula.",
    "Crackles at the right base; no wheeze; JVP not raised; no peripheral oedema.",
    "WBC 14.2 10*9/L, CRP 120 mg/L, procalcitonin 0.9 ng/mL, lactate 1.4 mmol/L.",
    "Denies chest pain, haemoptysis or recent travel; no sick contacts.",
]


def make_note(n_sentences: int, ref: str = "DocumentReference/bench") -> Note:
    body = " ".join(
        SENTENCES[i % len(SENTENCES)].replace("38.6", f"38.{i % 10}") for i in range(n_sentences)
    )
    text = (
        f"HPI: {body}\n\nIMPRESSION: right lower lobe pneumonia.\nA/P: ceftriaxone, azithromycin."
    )
    return Note(text=text, reference=ref)


def timed(fn: Callable[[], object], repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    t0 = time.perf_counter()
    enc = TextEncoder.from_pretrained()
    print(f"model {enc.model_id} on {enc.device}, torch threads {torch.get_num_threads()}")
    print(f"load (import + hash + weights): {time.perf_counter() - t0:.2f} s")

    note = make_note(400)
    n_tok = len(enc.tokenizer(note.text, verbose=False)["input_ids"])
    for max_tokens in (512, 256):
        chunks = chunk_note(note, enc.tokenizer, max_tokens, max_tokens // 8)[:32]
        widths = [len(enc.tokenizer(c.text)["input_ids"]) for c in chunks]
        enc.embed_chunks(chunks[:2], args.batch_size)  # warm-up
        t_chunk = timed(
            partial(chunk_note, note, enc.tokenizer, max_tokens, max_tokens // 8), args.repeats
        )
        t_embed = timed(partial(enc.embed_chunks, chunks, args.batch_size), args.repeats)
        print(
            f"{max_tokens}-token chunks: {len(chunks)} of {min(widths)}-{max(widths)} tokens, "
            f"{len(chunks) / t_embed:.1f} chunks/s ({1000 * t_embed / len(chunks):.0f} ms/chunk, "
            f"batch {args.batch_size}); chunking a {n_tok}-token note: {1000 * t_chunk:.0f} ms"
        )

    # A typical inpatient note (~1,000 tokens) end to end at the default length.
    notes = [make_note(40, f"DocumentReference/n{i}") for i in range(8)]
    notes = [
        Note(text=n.text.replace("T max", f"T max (day {i})"), reference=n.reference)
        for i, n in enumerate(notes)
    ]
    t_notes = timed(partial(enc.encode, notes), args.repeats)
    n_tok = len(enc.tokenizer(notes[0].text, verbose=False)["input_ids"])
    print(
        f"encode(): {len(notes)} notes of ~{n_tok} tokens at max_tokens={enc.max_tokens}: "
        f"{len(notes) / t_notes:.2f} notes/s"
    )


if __name__ == "__main__":
    main()
