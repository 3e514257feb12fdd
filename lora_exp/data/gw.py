"""A gravitational-wave detection dataset made offline (``data=gw_synthetic``), G2Net-style.

Each example is 3 detectors (H1, L1, V1) x ``duration`` s of strain at ``sample_rate`` Hz (G2Net: 2 s at
2048 Hz): coloured Gaussian noise with an analytic aLIGO-like PSD (Ajith 2011's zero-detuned high-power
fit), and for a ``positive_fraction`` of them an injected compact-binary inspiral. The chirp is leading
order (Newtonian): frequency ``f(tau) = (5 / (256 tau))^(3/8) / (pi Mc^(5/8))`` and amplitude
``~ (Mc f)^(2/3)`` up to the ISCO of the total mass, for component masses drawn from ``masses``. Each
detector sees it with its own amplitude, phase and light-travel delay (a simplified projection, not real
antenna patterns), scaled so the *network* optimal SNR ``sqrt(sum_d 4 df sum |h(f)|^2 / S_d(f))`` over
``[f_low, f_high]`` equals a value drawn from ``snr``. Every series is then whitened with the PSD it was
coloured with (and band-limited to ``[f_low, f_high]``): unit-variance white noise in the band, so a
whitened template's Euclidean norm is its optimal SNR.

Everything derives from ``seed`` (one child seed per split); the arrays are written once to
``$LORA_EXP_CACHE/gw/<hash of the options>/`` (``~/.cache/lora-exp`` by default) and read back after.

How a series reaches an audio model: see ``to_audio`` (``mapping=concat`` puts the 3 whitened detectors
back to back, ``sum`` adds them); ``lora_exp.audio`` resamples that mono signal from ``sample_rate`` to the
feature extractor's rate (16 kHz for Whisper), keeping time and frequency true.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lora_exp.errors import LoraExpError

MSUN_S = 4.925490947e-6  # G * M_sun / c^3 in seconds
DETECTORS = {"H1": 1.0, "L1": 1.0, "V1": 1.5}  # relative noise amplitude (Virgo a little noisier)
MAX_DELAY_S = {"H1": 0.0, "L1": 0.010, "V1": 0.027}  # light-travel time from H1 (bounds of the delay)
MAPPINGS = ("concat", "sum")
SPLITS = ("train", "validation", "test")
FORMAT_VERSION = 1  # bump when the generated arrays change for the same options


@dataclass
class GwOptions:
    """Generator options: the ``data.gw`` schema of the config (one definition) and the generator's input;
    their hash names the cache entry."""

    n_train: int = 1000
    n_validation: int = 1000
    n_test: int = 1000
    sample_rate: int = 2048
    duration: float = 2.0
    detectors: list[str] = field(default_factory=lambda: ["H1", "L1", "V1"])
    snr: list[float] = field(default_factory=lambda: [8.0, 20.0])  # network optimal SNR range of the injections
    masses: list[float] = field(default_factory=lambda: [10.0, 50.0])  # component masses, solar masses
    merger: list[float] = field(default_factory=lambda: [0.6, 0.95])  # merger time as a fraction of the window
    f_low: float = 20.0
    f_high: float = 1000.0
    positive_fraction: float = 0.5
    mapping: str = "concat"  # how the detectors become one audio channel: concat | sum
    seed: int = 0

    @classmethod
    def from_cfg(cls, cfg: GwOptions | dict[str, Any]) -> GwOptions:
        """From ``data.gw`` (the typed config's ``GwOptions`` or a plain dict); lists become tuples so the options
        hash and compare."""
        d = asdict(cfg) if is_dataclass(cfg) else dict(cfg)
        return cls(**{k: tuple(v) if isinstance(v, list | tuple) else v for k, v in d.items()})

    def sizes(self) -> dict[str, int]:
        return {"train": self.n_train, "validation": self.n_validation, "test": self.n_test}

    def key(self) -> str:
        blob = json.dumps({"v": FORMAT_VERSION, **asdict(self)}, sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def clip_seconds(self) -> float:
        """Length of the audio signal ``to_audio`` makes (at any sampling rate)."""
        return self.duration * (len(self.detectors) if self.mapping == "concat" else 1)


def check(o: GwOptions) -> list[str]:
    """Problems with the options, one line each (``data.gw.<option>`` named)."""
    e = []
    if min(o.n_train, o.n_validation, o.n_test) < 2:
        e.append("data.gw.n_train / n_validation / n_test must each be >= 2")
    if not set(o.detectors) <= set(DETECTORS) or not o.detectors or len(set(o.detectors)) != len(o.detectors):
        e.append(f"data.gw.detectors={list(o.detectors)} must be distinct names among {sorted(DETECTORS)}")
    if not (len(o.snr) == 2 and 0 < o.snr[0] <= o.snr[1]):
        e.append(f"data.gw.snr={list(o.snr)} must be [low, high] with 0 < low <= high")
    if not (len(o.masses) == 2 and 1 <= o.masses[0] <= o.masses[1] <= 200):
        e.append(f"data.gw.masses={list(o.masses)} must be [low, high] solar masses within [1, 200]")
    if not (len(o.merger) == 2 and 0 < o.merger[0] <= o.merger[1] <= 1):
        e.append(f"data.gw.merger={list(o.merger)} must be [low, high] fractions of the window within (0, 1]")
    if not 0 < o.f_low < o.f_high < o.sample_rate / 2:
        e.append(f"data.gw.f_low={o.f_low}, f_high={o.f_high} need 0 < f_low < f_high < sample_rate/2")
    if not 0 < o.positive_fraction < 1:
        e.append(f"data.gw.positive_fraction={o.positive_fraction} must be in (0, 1)")
    if o.mapping not in MAPPINGS:
        e.append(f"data.gw.mapping={o.mapping!r} is not one of {', '.join(MAPPINGS)}")
    if o.duration * o.sample_rate < 256:
        e.append("data.gw.duration x sample_rate must give >= 256 samples")
    return e


def aligo_psd(f: np.ndarray) -> np.ndarray:
    """One-sided PSD (1/Hz) of Ajith (2011)'s analytic aLIGO zero-detuned high-power fit, x = f / 215 Hz."""
    x = np.maximum(f, 1.0) / 215.0
    return 1e-49 * (x**-4.14 - 5 * x**-2 + 111 * (1 - x**2 + x**4 / 2) / (1 + x**2 / 2))


def chirp(t: np.ndarray, m1: float, m2: float, t_merge: float, phase: float) -> np.ndarray:
    """Leading-order inspiral ``A(t) cos(phi(t))`` (arbitrary scale), zero after ISCO / merger."""
    m_tot = (m1 + m2) * MSUN_S
    mc = (m1 * m2) ** 0.6 / (m1 + m2) ** 0.2 * MSUN_S
    tau = np.clip(t_merge - t, 1e-6, None)
    f = (5.0 / (256.0 * tau)) ** 0.375 / (np.pi * mc**0.625)
    f_isco = 1.0 / (6**1.5 * np.pi * m_tot)
    phi = -2.0 * (tau / (5.0 * mc)) ** 0.625 + phase
    h = (mc * f) ** (2.0 / 3.0) * np.cos(phi)
    live = (t < t_merge) & (f < f_isco)
    return np.where(live, h, 0.0)


def _onset_taper(n: int, sample_rate: int) -> np.ndarray:
    """A 0.1 s half-Hann at the window start: a chirp already running at t=0 does not start as a step."""
    w = np.ones(n)
    m = min(n, int(0.1 * sample_rate))
    w[:m] = 0.5 - 0.5 * np.cos(np.pi * np.arange(m) / m)
    return w


class _Spectra:
    """Per-detector colouring / whitening factors on the rfft grid and the optimal-SNR inner product."""

    def __init__(self, o: GwOptions):
        n = int(round(o.duration * o.sample_rate))
        self.n, self.dt = n, 1.0 / o.sample_rate
        self.freqs = np.fft.rfftfreq(n, self.dt)
        self.band = (self.freqs >= o.f_low) & (self.freqs <= o.f_high)
        psd = aligo_psd(self.freqs)
        # psd[d] per detector; the std of each real-FFT bin of unit white noise maps to sigma^2 = S fs / 2.
        self.psd = np.stack([psd * DETECTORS[d] ** 2 for d in o.detectors])
        self.colour = np.sqrt(self.psd * o.sample_rate / 2)

    def optimal_snr(self, h: np.ndarray) -> np.ndarray:
        """Per-detector ``sqrt(4 df sum_band |h~(f)|^2 / S(f))`` of strains ``h`` (detectors x samples)."""
        hf = np.fft.rfft(h, axis=-1) * self.dt
        df = 1.0 / (self.n * self.dt)
        return np.sqrt(4 * df * np.sum(np.abs(hf[:, self.band]) ** 2 / self.psd[:, self.band], axis=-1))

    def whiten(self, x: np.ndarray) -> np.ndarray:
        """Divide by the ASD (to unit-variance white noise) and keep ``[f_low, f_high]``."""
        xf = np.fft.rfft(x, axis=-1) / self.colour
        xf[..., ~self.band] = 0.0
        return np.fft.irfft(xf, n=self.n, axis=-1)


def simulate(o: GwOptions, n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` examples: whitened ``strain`` (n, detectors, samples) float32, ``label``, and for analysis the
    whitened injected ``template`` (zeros for noise), network ``snr`` (0 for noise), ``m1``, ``m2``."""
    rng = np.random.default_rng(seed)
    sp, n_det = _Spectra(o), len(o.detectors)
    t = np.arange(sp.n) * sp.dt
    taper = _onset_taper(sp.n, o.sample_rate)
    n_pos = int(round(n * o.positive_fraction))
    labels = rng.permutation(np.r_[np.ones(n_pos, np.int64), np.zeros(n - n_pos, np.int64)])
    out = {k: np.zeros(n, np.float32) for k in ("snr", "m1", "m2")}
    strain = np.zeros((n, n_det, sp.n), np.float32)
    templates = np.zeros((n, n_det, sp.n), np.float32)
    for i in range(n):
        noise = np.fft.irfft(np.fft.rfft(rng.standard_normal((n_det, sp.n)), axis=-1) * sp.colour, n=sp.n, axis=-1)
        if labels[i]:
            m1, m2 = np.sort(rng.uniform(*o.masses, size=2))[::-1]
            t_merge = rng.uniform(*o.merger) * o.duration
            amp = rng.uniform(0.3, 1.0, n_det)
            phase = rng.uniform(0, 2 * np.pi, n_det)
            delay = [rng.uniform(-MAX_DELAY_S[d], MAX_DELAY_S[d]) for d in o.detectors]
            h = np.stack([a * chirp(t, m1, m2, t_merge + dl, p) for a, p, dl in zip(amp, phase, delay)]) * taper
            snr = rng.uniform(*o.snr)
            h *= snr / np.sqrt(np.sum(sp.optimal_snr(h) ** 2))
            templates[i] = sp.whiten(h)
            noise += h
            out["snr"][i], out["m1"][i], out["m2"][i] = snr, m1, m2
        strain[i] = sp.whiten(noise)
    return {"strain": strain, "label": labels, "template": templates, **out}


def cache_root() -> Path:
    """``$LORA_EXP_CACHE/gw`` (``~/.cache/lora-exp/gw`` by default)."""
    return Path(os.environ.get("LORA_EXP_CACHE", Path.home() / ".cache" / "lora-exp")) / "gw"


def split_seeds(seed: int) -> dict[str, int]:
    """Independent child seeds per split, so changing one split's size leaves the others' content alone."""
    children = np.random.SeedSequence(seed).spawn(len(SPLITS))
    return {s: int(c.generate_state(1)[0]) for s, c in zip(SPLITS, children)}


def generate(o: GwOptions) -> Path:
    """Write every split once (atomically: temp dir + rename) and return the cache folder."""
    errors = check(o)
    if errors:
        raise LoraExpError("\n".join(errors))
    final = cache_root() / o.key()
    if (final / "meta.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".tmp-"))
    seeds = split_seeds(o.seed)
    for split, n in o.sizes().items():
        sim = simulate(o, n, seeds[split])
        np.savez(tmp / f"{split}.npz", **{k: v for k, v in sim.items() if k != "template"})
    (tmp / "meta.json").write_text(json.dumps({"options": asdict(o), "version": FORMAT_VERSION}, indent=2))
    try:
        tmp.rename(final)
    except OSError:  # another process wrote it first: theirs is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load(o: GwOptions) -> dict[str, dict[str, np.ndarray]]:
    """Every split as arrays (``strain``, ``label``, ``snr``, ``m1``, ``m2``), generated on first use."""
    folder = generate(o)
    out = {}
    for split in SPLITS:
        with np.load(folder / f"{split}.npz") as z:
            out[split] = {k: z[k] for k in z.files}
    return out


def to_audio(strain: np.ndarray, mapping: str) -> np.ndarray:
    """One mono signal per example at the generator's rate, from (…, detectors, samples).

    ``concat`` (default): the detectors back to back (H1 | L1 | V1): nothing is lost, each detector's
    chirp stays visible on its own. ``sum``: their sum / sqrt(detectors) (unit noise variance kept),
    3x shorter, but per-detector phases can partly cancel the signal.
    """
    if mapping == "concat":
        return strain.reshape(*strain.shape[:-2], -1)
    if mapping == "sum":
        return strain.sum(axis=-2) / np.sqrt(strain.shape[-2])
    raise LoraExpError(f"data.gw.mapping={mapping!r} is not one of {', '.join(MAPPINGS)}")


LABEL_NAMES = ["noise", "signal"]


def as_splits(o: GwOptions) -> Any:
    """A ``DatasetDict`` (train / validation / test) of ``audio`` (the mono signal ``to_audio`` makes, at
    ``o.sample_rate``), ``label`` (ClassLabel noise / signal) and ``snr`` (0 for noise), Arrow-backed
    zero-copy from the cached arrays."""
    import datasets
    import pyarrow as pa

    out = {}
    for split, arr in load(o).items():
        audio = np.ascontiguousarray(to_audio(arr["strain"], o.mapping), dtype=np.float32)
        feats = datasets.Features(
            {
                "audio": datasets.Sequence(datasets.Value("float32"), length=audio.shape[1]),
                "label": datasets.ClassLabel(names=LABEL_NAMES),
                "snr": datasets.Value("float32"),
            }
        )
        table = pa.table(
            {
                "audio": pa.FixedSizeListArray.from_arrays(pa.array(audio.ravel()), audio.shape[1]),
                "label": pa.array(arr["label"].astype(np.int64)),
                "snr": pa.array(arr["snr"].astype(np.float32)),
            }
        )
        out[split] = datasets.Dataset(table.cast(feats.arrow_schema))
    return datasets.DatasetDict(out)
