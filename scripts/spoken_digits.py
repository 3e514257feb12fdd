"""A spoken-digit audio set made offline with Debian's espeak-ng, in the audiofolder layout (issue 25's measurement).

10 classes (zero .. nine) x N clips. Each clip: the word spoken by ``espeak-ng`` with a random English voice (8 of
its gmw voices) and variant (none, +m1..+m7, +f1..+f4), speed 120..240 words/min, pitch 20..80; 0..0.3 s of silence
before it; white Gaussian noise at an SNR drawn from 5..25 dB (against the word's RMS); written as 16-bit PCM mono
at a rate drawn from 8,000 / 16,000 / 22,050 / 44,100 Hz (polyphase resampling from espeak's 22,050 Hz). Seeded.
A manifest (``OUT-manifest.tsv``) records each clip's voice, speed, pitch, SNR, rate and length.

  python scripts/spoken_digits.py /abs/spoken-digits 40 0
  lora-exp model=whisper_tiny_en data=files data.path=/abs/spoken-digits data.num_labels=10 data.max_seconds=1.5
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from math import gcd
from pathlib import Path

import numpy as np
from scipy.io import wavfile
from scipy.signal import resample_poly

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
VOICES = ["en-gb", "en-us", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029", "en-us-nyc"]
VARIANTS = ["", *(f"+m{i}" for i in range(1, 8)), *(f"+f{i}" for i in range(1, 5))]
RATES = [8000, 16000, 22050, 44100]


def clip(word: str, rng: np.random.Generator, tmp: str) -> tuple[np.ndarray, int, tuple]:
    """One noisy spoken word at a random rate, as int16, with what it was made from."""
    voice = VOICES[rng.integers(len(VOICES))] + VARIANTS[rng.integers(len(VARIANTS))]
    speed, pitch = int(rng.integers(120, 241)), int(rng.integers(20, 81))
    out = f"{tmp}/x.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", out, word], check=True)
    rate, x = wavfile.read(out)
    x = np.r_[np.zeros(int(rng.uniform(0, 0.3) * rate), np.float32), x.astype(np.float32) / 32768]
    snr = rng.uniform(5, 25)
    voiced = np.abs(x) > 1e-3
    rms = np.sqrt(np.mean(x[voiced] ** 2)) if voiced.any() else 0.1
    x = x + rng.standard_normal(len(x)).astype(np.float32) * rms / 10 ** (snr / 20)
    target = RATES[rng.integers(len(RATES))]
    g = gcd(rate, target)
    y = resample_poly(x, target // g, rate // g) if target != rate else x
    y = np.clip(y / max(1.0, np.abs(y).max()), -1, 1)
    return (y * 32767).astype(np.int16), target, (voice, speed, pitch, round(snr, 1))


def main(out: Path, n: int, seed: int) -> None:
    """``n`` clips per word under ``out/<word>/``, and the manifest next to ``out``."""
    rng, rows = np.random.default_rng(seed), []
    with tempfile.TemporaryDirectory() as tmp:
        for word in WORDS:
            (out / word).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                y, rate, made = clip(word, rng, tmp)
                wavfile.write(out / word / f"{word}_{i:03d}.wav", rate, y)
                rows.append((f"{word}/{word}_{i:03d}.wav", word, *made, rate, len(y) / rate))
    lines = ["path\tlabel\tvoice\tspeed\tpitch\tsnr_db\trate\tseconds", *("\t".join(map(str, r)) for r in rows)]
    (out.parent / f"{out.name}-manifest.tsv").write_text("\n".join(lines) + "\n")
    print(f"{len(rows)} clips in {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
