#!/usr/bin/env python3
"""Makes the small delayed-streams TEXT-TO-SPEECH fixture that Parley's Rust tests compare
against: tests/fixtures/tts-tiny/.

Uses the official `moshi` package (pinned in requirements.txt), CPU, float32. Needs the
Mimi fixture (make_mimi_fixtures.py) first: its codec decodes the generated codes.

What it builds: a random-weight model with every structural feature of Kyutai's published
kyutai/tts-1.6b-en_fr (see shared/MODEL_FACTS.md), at reduced sizes:
  - cross-attention in every temporal layer, on the `speaker_wavs` conditioning (tensor
    conditioner, dim 512 as published: voice latents [1, 512, 125], up to 5 speaker
    slots, unused slots masked), with the sinusoidal position embedding of the fuser;
  - `cfg` and `control` lookup-table conditioners summed into every step's input (CFG is
    distilled: the cfg value goes through the `cfg` conditioner, one pass, no doubled
    batch);
  - the two-stream (demuxed) text embedding, a depformer with low-rank embeddings,
    multi-linear input and a weight-set schedule shared by several steps;
  - delays [0, 0] + [2] * (n_q - 1), the published audio_delay (1.28 s = 16 steps) and
    second_stream_ahead 2;
  - a temporal context shorter than every generation, so the attention ring wraps.

The directory is laid out like the Hub repository: config.json (the published keys in the
published order), model.safetensors (the published parameter names, all f32; checked
against tests/fixtures/published/tts-1.6b-en_fr.json), mimi.safetensors and
mimi_config.json copied from mimi-tiny, tokenizer.model (SentencePiece, trained here),
and two random voices voice_a / voice_b.safetensors (tensor `speaker_wavs` f32
[1, 512, 125], like the kyutai/tts-voices files).

The model is loaded back through the reference's own loaders (CheckpointInfo ->
TTSModel.from_checkpoint_info) and the reference's `simple_generate` runs GREEDILY
(temperature 0) for two sentences x two voices: prepare_script([text],
padding_between=1), make_condition_attributes([voice], cfg_coef=2.0), generate, then a
streaming Mimi decode of the frames from delay_steps on with the first two decoded frames
dropped and end_step frames kept. Saved for each case `s{sentence}_{voice}`:
  _tokens.npy       int64 [1 + n_q, steps - 2]: the frames the generator returned
                    (text token fed, then the audio tokens, -1 before the audio delay);
  _text_log.npy     int64 [2, steps]: per step, the greedy text token and the token fed;
  _text_logits.npy  f32 [steps, text_card]: the text logits of every step;
  _audio.wav        24 kHz 16-bit mono: the decoded audio simple_generate returned;
and condition_sum.npy (f32 [dim], the control + cfg input offset). tts_cases.json says
what every value means and describes each case (text, entries, voice, cfg, steps,
end_step, frames dropped, when each word was consumed).

A seed is kept only if every greedy choice (text and depformer) wins by a clear margin,
the model itself starts some words and the state machine forces others, the voice
changes the text timing, and the audio tokens vary over time and between voices and
sentences. The attention ring must have wrapped. The script then reloads the saved files
and regenerates every case, which must give identical results; a second run of the
script gives identical files.

    NO_TORCH_COMPILE=1 /var/tmp/refenv/bin/python tests/reference/make_tts_fixtures.py
"""

import copy
import io
import json
import os
import shutil
import wave
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import numpy as np
import sentencepiece as spm
import torch
from safetensors.torch import save_file

from moshi.conditioners import ConditionAttributes
from moshi.models.loaders import CheckpointInfo, get_moshi_lm
from moshi.models.tts import TTSModel
from moshi.modules import transformer as mtr

import make_lm_fixtures as lf

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"
OUT = FIX / "tts-tiny"
MIMI_DIR = lf.MIMI_DIR
PUBLISHED_LAYOUT = FIX / "published" / "tts-1.6b-en_fr.json"
MIN_GAP = 1e-3  # smallest accepted gap between the best and second-best logit
CFG = 2.0  # simple_generate's default cfg_coef; a distilled model takes it as a condition
VOCAB = 96  # SentencePiece pieces requested (text_card is the size actually trained)

# Words of the sentences are covered by this corpus (no unknown characters: the unknown
# id 0 would read as the TTS's new-word token).
# The break lasts round(0.2 * 12.5) = round(2.5) pads: Python rounds half to even (2).
SENTENCES = [
    "Hello, this is Parley.",
    'Good morning! <break time="0.2s"/> Shall we?',
]
SPM_TEXT = lf.SPM_TEXT + [
    "Hello, this is Parley. Good morning! Shall we?",
    "Hello there, good evening. Parley is speaking, shall we talk?",
    "Good morning, this is a test. We begin speaking now!",
] * 20

VOICES = ["voice_a", "voice_b"]
LATENT_SHAPE = (1, 512, 125)  # a kyutai/tts-voices file: 10 s of 512-d Mimi latent

N_Q = 8  # = the tiny Mimi's codebooks (mimi-tiny: quantizer n_q 8, bins 32)

# The published kyutai/tts-1.6b-en_fr config.json (make_published_layouts.TTS) with the
# sizes reduced; keys in the published order. text_card is set from the trained tokenizer.
TTS = {
    "card": 32, "n_q": N_Q, "dep_q": N_Q, "delays": [0, 0] + [2] * (N_Q - 1), "dim": 32,
    "text_card": None, "existing_text_padding_id": 3, "num_heads": 4, "num_layers": 2,
    "hidden_scale": 4.125, "causal": True, "layer_scale": None, "context": 16,
    "max_period": 10000, "gating": "silu", "norm": "rms_norm_f32",
    "positional_embedding": "rope", "depformer_dim": 16, "depformer_num_heads": 2,
    "depformer_num_layers": 2, "depformer_dim_feedforward": 48,
    "depformer_multi_linear": True, "depformer_pos_emb": "none",
    "depformer_weights_per_step": True, "depformer_low_rank_embeddings": 8,
    "demux_second_stream": True, "text_card_out": None, "cross_attention": True,
    "conditioners": {
        "speaker_wavs": {"type": "tensor", "tensor": {"dim": 512}},
        "cfg": {"type": "lut", "lut": {"n_bins": 7, "dim": 16, "tokenizer": "noop",
                "possible_values": ["1.0", "1.5", "2.0", "2.5", "3.0", "3.5", "4.0"]}},
        "control": {"type": "lut", "lut": {"dim": 32, "n_bins": 1, "tokenizer": "noop",
                    "possible_values": ["ok"]}},
    },
    "fuser": {"cross_attention_pos_emb": True, "cross_attention_pos_emb_scale": 1,
              "sum": ["control", "cfg"], "prepend": [], "cross": ["speaker_wavs"]},
    "tts_config": {"audio_delay": 1.28, "second_stream_ahead": 2},
    "model_id": {"sig": "00tiny00", "epoch": 0},
    # Published: [0..7] then 8 x8, 9 x8, 10 x8 for 32 steps (a quarter alone, then three
    # shared groups); scaled to 8 steps: two alone, then three pairs.
    "depformer_weights_per_step_schedule": [0, 1, 2, 2, 3, 3, 4, 4],
    "tokenizer_name": "tokenizer.model",
    "mimi_name": "mimi.safetensors",
    "mimi_config_name": "mimi_config.json",
    "moshi_name": "model.safetensors", "model_type": "tts",
    "lm_gen_config": {"temp": 0.6, "text_temp": 0.6},
}
# The keys the reference's CheckpointInfo takes out of config.json before building.
METADATA = ["moshi_name", "mimi_name", "mimi_config_name", "tokenizer_name", "lora_name",
            "model_type", "lm_gen_config", "stt_config", "tts_config", "model_id"]


def lm_kwargs(config: dict) -> dict:
    """The LMModel keyword arguments of a config.json, as CheckpointInfo gives them to
    get_moshi_lm (a deep copy: the reference's get_conditioner writes into the dicts)."""
    kwargs = copy.deepcopy(config)
    for key in METADATA:
        kwargs.pop(key, None)
    return kwargs


def published_names(state: dict) -> dict:
    """The parameter names of Kyutai's published checkpoints. The reference keeps each
    attention's projections one per weight set (`in_projs.{i}.weight`); the published file
    stacks them on the rows as `in_proj_weight` / `out_proj.weight` (the reference's
    StreamingMultiheadAttention._load_hook splits them back). Unlike make_lm_fixtures'
    helper this also covers the cross-attention."""
    out, grouped = {}, {}
    for k, v in state.items():
        for kind, new in ((".in_projs.", ".in_proj_weight"), (".out_projs.", ".out_proj.weight")):
            if kind in k:
                prefix, rest = k.split(kind)
                grouped.setdefault(prefix + new, {})[int(rest.split(".")[0])] = v
                break
        else:
            out[k] = v.contiguous()
    for k, parts in grouped.items():
        out[k] = torch.cat([parts[i] for i in sorted(parts)], 0).contiguous()
    return out


def check_published_structure(names: dict, config: dict) -> None:
    """Every tensor name pattern of the published TTS checkpoint is present here and no
    other (indices of layers, codebooks and weight sets aside), with the same ranks."""
    def pattern(name: str) -> str:
        return ".".join("N" if p.isdigit() else p for p in name.split("."))
    published = json.loads(PUBLISHED_LAYOUT.read_text())["tensors"]
    want = {pattern(n): len(shape) for n, _, shape in published}
    have = {pattern(n): v.dim() for n, v in names.items()}
    wrong = {k: (want.get(k), have.get(k)) for k in want if want.get(k) != have.get(k)}
    assert want == have, (sorted(set(want) ^ set(have)), wrong)
    sets = max(config["depformer_weights_per_step_schedule"]) + 1
    dep_in = [n for n in names if n.startswith("depformer_in.")]
    assert len(dep_in) == sets, dep_in
    d = config["depformer_dim"]
    assert names["depformer.layers.0.self_attn.in_proj_weight"].shape == (3 * d * sets, d)


def train_tokenizer(prefix: Path) -> int:
    """A SentencePiece unigram model with make_lm_fixtures' settings (ids unk 0, bos 1,
    eos 2, pad 3, which the TTS reads as new_word, main, other, pad) on this script's
    corpus, but with the identity normalizer: the default nmt_nfkc one stores a 240 KB
    character map, which would break the fixture's size budget, and changes nothing for
    the ASCII words encoded here. Returns the number of pieces, which becomes text_card."""
    # Corpus from memory and model to memory, so that no path (a temporary directory's)
    # is recorded in the model's trainer spec and the file is the same on every run.
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_TEXT), model_writer=model, vocab_size=VOCAB,
        model_type="unigram", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
        pad_id=3, num_threads=1, minloglevel=2, hard_vocab_limit=False,
        normalization_rule_name="identity",
    )
    Path(str(prefix) + ".model").write_bytes(model.getvalue())
    return spm.SentencePieceProcessor(model_file=str(prefix) + ".model").get_piece_size()


def make_voices(out: Path) -> list[Path]:
    """Two random voice latents of the published shape. Each has its own per-channel
    mean (a stand-in for a speaker's timbre) plus time-varying noise, so the two voices
    differ even after cross-attention averages over time."""
    paths = []
    for i, name in enumerate(VOICES):
        gen = torch.Generator().manual_seed(1000 + i)
        mean = torch.randn(LATENT_SHAPE[0], LATENT_SHAPE[1], 1, generator=gen)
        latent = mean + 0.5 * torch.randn(*LATENT_SHAPE, generator=gen)
        path = out / f"{name}.safetensors"
        save_file({"speaker_wavs": latent.float().contiguous()}, str(path))
        paths.append(path)
    return paths


@torch.no_grad()
def random_model(config: dict, seed: int):
    """The reference's LMModel with its own random initialisation, then made informative
    (a random model at its initial scales settles into repeating one audio token and
    into near-ties):
      - norm parameters moved off their initial 1 / 0, so a missing scale or bias shows;
      - the control and cfg conditioners' projections scaled by 1/4, so that the constant
        they add to every step does not drown the per-step token embeddings, and the main
        audio embeddings scaled by 3, so the generated audio feeds back strongly;
      - both output heads scaled by 4, to the logit spread of a trained model, and the
        text head's rows other than new_word (0) and pad (3) by a further 0.3, so that the
        greedy text choice is mostly between those two as for a trained TTS (with all rows
        alike new_word would win about one step in text_card and every word would be
        forced by max_padding, leaving the text side untested); other tokens still win
        some steps, which the state machine reads as pad."""
    torch.manual_seed(seed)
    lm = get_moshi_lm(None, lm_kwargs=lm_kwargs(config), device="cpu", dtype=torch.float32)
    gen = torch.Generator().manual_seed(10_000 + seed)
    for name, p in lm.named_parameters():
        if name.endswith(".alpha") or name.endswith("norm_cross.weight"):
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
        elif name.endswith("norm_cross.bias"):
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
        elif name.startswith(("condition_provider.conditioners.control.output_proj",
                              "condition_provider.conditioners.cfg.output_proj")):
            p.mul_(0.25)
        elif name.startswith("emb."):
            p.mul_(3.0)
        elif name.startswith("linears."):
            p.mul_(4.0)
    rows = torch.full((lm.text_linear.weight.shape[0], 1), 4.0 * 0.3)
    rows[[0, 3]] = 4.0
    lm.text_linear.weight.mul_(rows)
    return lm.eval()


def load_tts(out: Path) -> TTSModel:
    """The directory loaded as a Hub repository would be, by the reference's loaders."""
    info = CheckpointInfo.from_hf_repo(
        "local/tts-tiny",
        moshi_weights=out / "model.safetensors", mimi_weights=out / "mimi.safetensors",
        tokenizer=out / "tokenizer.model", config_path=out / "config.json",
        mimi_config_path=out / "mimi_config.json")
    return TTSModel.from_checkpoint_info(info, device="cpu", dtype=torch.float32,
                                         n_q=N_Q, temp=0.0)


@torch.no_grad()
def synthesize(tts: TTSModel, text: str, voice: Path) -> dict:
    """One case through the reference's simple_generate, with spies that record what the
    public API does not return: the TTSResult (frames, state-machine log), the text
    logits of every step and the argmax margins of every text and depformer choice."""
    lm = tts.lm
    rec = {"text_logits": [], "depformer_gaps": []}
    orig_text, orig_dep, orig_generate = lm.forward_text, lm.forward_depformer, tts.generate

    def spy_text(*args, **kwargs):
        out, logits = orig_text(*args, **kwargs)
        rec["text_logits"].append(logits[0, 0, 0].clone())
        return out, logits

    def spy_dep(*args, **kwargs):
        logits = orig_dep(*args, **kwargs)
        rec["depformer_gaps"].append(lf.gap(logits))
        return logits

    def spy_generate(*args, **kwargs):
        result = orig_generate(*args, **kwargs)
        rec["result"] = result
        return result

    lm.forward_text, lm.forward_depformer, tts.generate = spy_text, spy_dep, spy_generate
    try:
        pcm = tts.simple_generate(text, str(voice), cfg_coef=CFG, show_progress=False)[0]
    finally:
        del lm.forward_text, lm.forward_depformer, tts.generate
    result = rec["result"]
    logits = torch.stack(rec["text_logits"])  # [steps, text_card]
    others = logits.clone()
    others[:, 0] = -float("inf")
    class_gap = (logits[:, 0] - others.max(-1).values).abs()
    log = np.array(result.logged_text_tokens[0], dtype=np.int64).T  # [2, steps]
    frames = torch.cat(result.frames, -1)[0].numpy().astype(np.int64)  # [1 + n_q, steps - 2]
    entries = tts.prepare_script([text], padding_between=1)
    return {
        "entries": [{"text": e.text, "tokens": list(e.tokens), "padding": e.padding}
                    for e in entries],
        "frames": frames, "text_log": log, "text_logits": logits.numpy().astype(np.float32),
        "pcm": pcm.numpy().astype(np.float32),
        "end_step": result.end_steps[0],
        "consumption_times": result.all_consumption_times[0],
        "transcript": [[w, s] for w, s in result.all_transcripts[0]],
        "min_text_gap": lf.gap(logits), "min_text_class_gap": float(class_gap.min()),
        "min_depformer_gap": min(rec["depformer_gaps"]),
    }


def audio_part(case: dict, delay_steps: int) -> np.ndarray:
    """The audio tokens of the frames Mimi decodes (from delay_steps on)."""
    return case["frames"][1:, delay_steps:]


def write_wav(path: Path, pcm: np.ndarray) -> None:
    """16-bit PCM, 24 kHz mono; the inverse of make_mimi_fixtures.read_wav (i16 / 32768).
    (f32 .npy would double the fixture's largest part, past its size budget.)"""
    data = np.clip(np.round(pcm.astype(np.float64) * 32768.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(lf.mf.SR)
        w.writeframes(data.tobytes())
    back = lf.mf.read_wav(path)
    assert back.shape == pcm.shape and np.abs(back - pcm).max() <= 1.0 / 32768 + 1e-9


def differ(a: np.ndarray, b: np.ndarray) -> float:
    n = min(a.shape[1], b.shape[1])
    return float((a[:, :n] != b[:, :n]).mean())


def evaluate(cases: dict, tts: TTSModel, context: int) -> tuple[bool, list[str]]:
    """The acceptance tests of one seed; returns (accepted, report lines)."""
    ds = tts.delay_steps
    lines, ok = [], True
    for key, c in cases.items():
        audio = audio_part(c, ds)
        steps = c["text_log"].shape[1]
        led = sum(1 for t in c["consumption_times"] if c["text_log"][0, t] == 0)
        distinct = min(len(np.unique(a)) for a in audio)
        change = min(float((np.diff(a) != 0).mean()) for a in audio)
        lines.append(
            f"  {key}: {steps} steps (context {context}), end_step {c['end_step']}, "
            f"{len(c['consumption_times'])} entries of which {led} started by the model, "
            f"min gaps text {c['min_text_gap']:.1e} (new-word decision "
            f"{c['min_text_class_gap']:.1e}) depformer {c['min_depformer_gap']:.1e}, "
            f"audio distinct/codebook >= {distinct}, change rate >= {change:.2f}")
        ok &= c["end_step"] is not None and steps > 2 * context
        ok &= c["min_text_gap"] > MIN_GAP and c["min_depformer_gap"] > MIN_GAP
        ok &= led >= 2
        ok &= distinct >= 6 and change > 0.3
    forced = sum(1 for c in cases.values() for t in c["consumption_times"]
                 if c["text_log"][0, t] != 0)
    lines.append(f"  entries started by the state machine (max_padding reached): {forced}")
    ok &= forced >= 1
    for s in range(len(SENTENCES)):
        a, b = (audio_part(cases[f"s{s}_{v}"], ds) for v in VOICES)
        d = differ(a, b)
        lines.append(f"  sentence {s}: audio tokens differing between the voices {d:.2f}")
        ok &= d > 0.5
    ends = [[cases[f"s{s}_{v}"]["end_step"] for v in VOICES] for s in range(len(SENTENCES))]
    lines.append(f"  end steps by sentence and voice: {ends}")
    ok &= any(len(set(e)) > 1 for e in ends)  # the voice changes the text side too
    for v in VOICES:
        d = differ(audio_part(cases[f"s0_{v}"], ds), audio_part(cases[f"s1_{v}"], ds))
        lines.append(f"  {v}: audio tokens differing between the sentences {d:.2f}")
        ok &= d > 0.5
    return ok, lines


def run_cases(tts: TTSModel, voices: list[Path]) -> dict:
    return {f"s{s}_{v.stem}": synthesize(tts, text, v)
            for s, text in enumerate(SENTENCES) for v in voices}


class RingWatch:
    """Records how far each attention ring (RingKVCache) was written, by capacity."""

    def __enter__(self):
        self.max_end = {}
        self.orig = mtr.RingKVCache.complete
        watch = self

        def complete(ring, k, v, exec_mask):
            res = watch.orig(ring, k, v, exec_mask)
            cap = ring.capacity
            watch.max_end[cap] = max(watch.max_end.get(cap, 0), int(ring.end_offset.max()))
            return res
        mtr.RingKVCache.complete = complete
        return self

    def __exit__(self, *exc):
        mtr.RingKVCache.complete = self.orig


@torch.no_grad()
def condition_tensors(tts: TTSModel, voice: Path):
    """The fuser's two inputs for one voice, as LMGen computes them: the [1, 1, dim] sum of
    the control and cfg conditioners, and the [1, 5 * 125, dim] cross-attention source
    (not saved: 80 KB a voice)."""
    attrs: ConditionAttributes = tts.make_condition_attributes([voice], cfg_coef=CFG)
    cond = tts.lm.condition_provider.prepare_and_provide([attrs])
    return tts.lm.fuser.get_sum(cond), tts.lm.fuser.get_cross(cond)


def main() -> None:
    torch.set_num_threads(1)  # deterministic reductions
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    config = copy.deepcopy(TTS)
    config["text_card"] = train_tokenizer(OUT / "tokenizer")
    shutil.copy(MIMI_DIR / "mimi.safetensors", OUT / "mimi.safetensors")
    shutil.copy(MIMI_DIR / "mimi_config.json", OUT / "mimi_config.json")
    (OUT / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    voices = make_voices(OUT)

    for seed in range(200):
        names = published_names(random_model(config, seed).state_dict())
        check_published_structure(names, config)
        save_file(names, str(OUT / "model.safetensors"))
        tts = load_tts(OUT)
        with RingWatch() as ring:
            cases = run_cases(tts, voices)
        ok, lines = evaluate(cases, tts, config["context"])
        print(f"seed {seed}: {'accepted' if ok else 'rejected'}")
        print("\n".join(lines))
        if ok:
            break
    else:
        raise SystemExit("no seed gave informative, tie-free outputs")
    wrapped = ring.max_end.get(config["context"], 0)
    assert wrapped > 2 * config["context"], f"main attention ring not wrapped: {ring.max_end}"

    # Determinism and the saved files: a fresh load regenerates every case identically.
    again = run_cases(load_tts(OUT), voices)
    for key, c in cases.items():
        for field in ("frames", "text_log", "text_logits", "pcm"):
            assert np.array_equal(c[field], again[key][field]), (key, field)

    described = []
    for key, c in cases.items():
        s, v = int(key[1]), key.split("_", 1)[1]
        # C order: readers of .npy files (candle) may not take Fortran order.
        np.save(OUT / f"{key}_tokens.npy", np.ascontiguousarray(c["frames"]))
        np.save(OUT / f"{key}_text_log.npy", np.ascontiguousarray(c["text_log"]))
        np.save(OUT / f"{key}_text_logits.npy", np.ascontiguousarray(c["text_logits"]))
        write_wav(OUT / f"{key}_audio.wav", c["pcm"])
        steps = c["text_log"].shape[1]
        described.append({
            "name": key, "text": SENTENCES[s], "script": [SENTENCES[s]],
            "voice": f"{v}.safetensors", "cfg": format(CFG, ".1f"), "padding_between": 1,
            "entries": c["entries"],
            "steps": steps, "frames_returned": c["frames"].shape[1],
            "end_step": c["end_step"],
            "decoded_frames": c["frames"].shape[1] - tts.delay_steps,
            "frames_dropped_after_delay": 2,
            "audio_frames": c["end_step"], "audio_samples": int(c["pcm"].shape[0]),
            "consumption_times": c["consumption_times"], "transcript": c["transcript"],
            "tokens": f"{key}_tokens.npy", "text_log": f"{key}_text_log.npy",
            "text_logits": f"{key}_text_logits.npy", "audio": f"{key}_audio.wav",
        })
    sums = [condition_tensors(tts, v)[0] for v in voices]
    assert torch.equal(sums[0], sums[1])
    np.save(OUT / "condition_sum.npy", sums[0][0, 0].numpy().astype(np.float32))

    ids = tts.machine.token_ids
    doc = {
        "seed": seed,
        "generator": "moshi 0.2.13 TTSModel.simple_generate, greedy (temp 0), batch 1, f32 CPU",
        "text_card": config["text_card"], "mux_card": ids.card,
        "token_ids": {"new_word": ids.new_word, "pad": ids.pad, "main": ids.main,
                      "other": ids.other, "zero": ids.zero, "ungenerated": ids.ungenerated},
        "initial_text_token": tts.lm.text_initial_token_id,
        "initial_audio_token": tts.lm.initial_token_id,
        "max_padding": tts.machine.max_padding, "initial_padding": tts.machine.initial_padding,
        "second_stream_ahead": tts.machine.second_stream_ahead,
        "delay_steps": tts.delay_steps, "final_padding": tts.final_padding,
        "max_speakers": tts.max_speakers, "n_q": tts.n_q,
        "delays": tts.lm.delays, "context": config["context"],
        # How far each attention ring was written (writes past its capacity wrap).
        "ring_max_written": {
            f"temporal transformer (capacity {config['context']})": ring.max_end[config["context"]],
            f"depformer (capacity dep_q {N_Q}, new every step)": ring.max_end.get(N_Q),
            "mimi transformers (capacity 12)": ring.max_end.get(12),
        },
        "procedure": [
            "Step 0 feeds the initial tokens: text text_card, audio card. An audio codebook "
            "with delay d is fed its initial token while step <= d; -1 is embedded as zero.",
            "Each step: main transformer (input = sum of audio and demuxed text embeddings + "
            "condition_sum; cross-attention on the voice) -> text logits -> greedy text token "
            "-> state machine -> the token fed (multiplexed); the depformer then starts from "
            "the FED token, not the predicted one.",
            "State machine: predictions other than new_word/pad count as pad; while word "
            "tokens are queued or forced padding remains it pads; with no padding left "
            "(max_padding pads since the last word) it forces new_word; new_word pops the "
            "next entry, queues its tokens, sets forced padding = entry.padding and queues "
            "the tokens of the entry second_stream_ahead entries on (entries with tokens) "
            "for the second stream; a new_word step feeds the first queued token on the "
            "first stream and new_word (0) on the second; a break entry (no tokens) is fed "
            "as pad. Asking for a word after the last one sets end_step (fed as new_word on "
            "the second stream once).",
            "Audio token q sampled at step t is replaced by -1 while t < delays[q + 1] + "
            "delay_steps; for t < delay_steps the depformer is not run at all.",
            "Generation stops before step end_step + delay_steps + final_padding.",
            "Mimi streaming-decodes frames[delay_steps:] (all of them), the first 2 decoded "
            "frames are dropped and end_step frames kept, each sample clipped to [-1, 1].",
        ],
        "files": {
            "tokens": "int64 [1 + n_q, steps - 2]: the frames LMGen.step returned, delays "
                      "undone (frame f = text fed after step f, audio sampled for time f). "
                      "Row 0 is the text token the state machine fed, multiplexed as "
                      "(second + 1) * mux_card + first. Audio rows are -1 (token_ids.zero, "
                      "embedded as 0) before delay_steps.",
            "text_log": "int64 [2, steps]: per LM step, row 0 the greedy text token the model "
                        "predicted, row 1 the (multiplexed) token the state machine fed.",
            "text_logits": "f32 [steps, text_card]: the text logits of every step.",
            "audio": "24 kHz mono 16-bit WAV of end_step * 1920 samples: simple_generate's "
                     "output (clipped to [-1, 1]: Mimi streaming-decodes frames[delay_steps:], "
                     "drops the first 2 decoded frames, keeps end_step frames), stored as "
                     "round(x * 32768) clamped to i16; read back as i16 / 32768 it is within "
                     "1.6e-5 of the reference's f32 samples (3.1e-5 at +1.0).",
            "condition_sum.npy": "f32 [dim]: control('ok') + cfg('2.0') conditioner outputs, "
                                 "added to every step's input embedding.",
        },
        "cases": described,
    }
    (OUT / "tts_cases.json").write_text(json.dumps(doc, indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"ring writes by capacity: {ring.max_end} (temporal context {config['context']}); "
          f"fixture {total / 1e6:.2f} MB in {OUT}")
    for c in described:
        print(f"{c['name']}: {c['steps']} steps, end_step {c['end_step']}, "
              f"{c['audio_samples']} samples; words at {c['consumption_times']}")


if __name__ == "__main__":
    main()
