"""Loading a GGUF file (llama.cpp's format) as an ordinary transformers model.

transformers reads GGUF itself (``from_pretrained(folder, gguf_file=name)``): the config, the
tokenizer and its chat template come from the file's metadata, and the weights are dequantized
into the requested dtype. This module decides which file a model config names (``model.name_or_path``
a ``.gguf`` file, or a folder / hub repo with ``model.gguf_file``), checks what can be checked
before the load (the ``gguf`` package, the file), and turns failures into one-line
:class:`UserError` messages.

The model it returns is dense (no quantizer attached), so forgetless trains it and saves it as a
plain safetensors model like any other; an adapter run references the ``.gguf`` file as its base
(forgetless.models.saving), which loads again to the same weights.
"""

from __future__ import annotations

import functools
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from forgetless.errors import UserError

GGUF_SUFFIX = ".gguf"
GGUF_MIN_VERSION = "0.10"
INSTALL_HINT = "pip install 'forgetless[gguf]'"


@dataclass(frozen=True)
class GgufSource:
    """A GGUF file: the folder (or hub repo) holding it and its name there."""

    repo: str
    file: str
    local: bool

    @property
    def path(self) -> Path:
        return Path(self.repo) / self.file

    def __str__(self) -> str:
        return str(self.path) if self.local else f"{self.repo} ({self.file})"


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def gguf_source(name_or_path: str, gguf_file: Optional[str]) -> Optional[GgufSource]:
    """The GGUF file that ``model.name_or_path`` and ``model.gguf_file`` name, or None for a model
    that is no GGUF; a UserError when they name a GGUF that is not there."""
    p = Path(name_or_path).expanduser()
    if gguf_file:
        if p.is_dir():
            f = p / Path(gguf_file).expanduser()
            if not f.is_file():
                found = sorted(x.name for x in p.glob("*" + GGUF_SUFFIX))
                there = f"it holds {', '.join(found[:5])}" if found else "it holds no .gguf file"
                raise UserError(f"model {name_or_path!r}: model.gguf_file {gguf_file!r} is not in the folder ({there}); check the file name")
            return GgufSource(str(f.parent), f.name, True)
        if p.exists():
            raise UserError(
                f"model {name_or_path!r}: with model.gguf_file set, model.name_or_path is the folder (or hub repo) holding "
                f"that file, not a file; give the folder, or give the .gguf file as model.name_or_path and drop model.gguf_file"
            )
        if _looks_local(name_or_path):
            raise UserError(f"model {name_or_path!r}: directory not found (model.gguf_file {gguf_file!r} is read from it); check the path")
        return GgufSource(name_or_path, gguf_file, False)  # a hub repo holding GGUF files
    if p.suffix.lower() == GGUF_SUFFIX and not p.is_dir():
        if not p.is_file():
            raise UserError(
                f"model {name_or_path!r}: GGUF file not found; check the path "
                f"(`forgetless fetch smollm2` downloads a small one and prints its path)"
            )
        return GgufSource(str(p.parent), p.name, True)
    if p.is_dir() and not (p / "config.json").is_file():
        found = sorted(x.name for x in p.glob("*" + GGUF_SUFFIX))
        if found:
            raise UserError(
                f"model {name_or_path!r}: the folder holds GGUF files ({', '.join(found[:5])}) but no config.json; "
                f"name the one to load with model.gguf_file={found[0]}"
            )
    return None


def check_gguf_package(what: str) -> None:
    """A UserError unless the ``gguf`` package transformers reads GGUF files with is installed."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError(f"{what}: loading a .gguf file needs the gguf package (gguf>={GGUF_MIN_VERSION}); {INSTALL_HINT}") from None
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        installed = version("gguf")
    except PackageNotFoundError:  # importable but not installed as a distribution (a source checkout)
        return
    if Version(installed) < Version(GGUF_MIN_VERSION):
        raise UserError(f"{what}: gguf {installed} is installed, loading a .gguf file needs gguf>={GGUF_MIN_VERSION}; {INSTALL_HINT}")


def supported_architectures() -> list[str]:
    """The ``general.architecture`` values the installed transformers loads from GGUF."""
    names: set[str] = set()
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        names.update(GGUF_SUPPORTED_ARCHITECTURES)
    except ImportError:  # pragma: no cover - a transformers without GGUF support
        pass
    try:
        from transformers.integrations.gguf import GGUF_ARCHS  # the newer loader (transformers >= 5.2x)

        names.update(GGUF_ARCHS)
    except ImportError:
        pass
    return sorted(names - {"general", "tokenizer"})  # sections of the metadata mapping, not architectures


# GGUF metadata value types: fixed-size scalars (struct format), 8 = string, 9 = array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_architecture(path: Path) -> Optional[str]:
    """``general.architecture`` from a GGUF file's header (None if it has none); reads no tensor
    data, and stops at the key (llama.cpp writes it first). A UserError if the file is no GGUF."""
    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 24 or head[:4] != b"GGUF":
            raise UserError(f"model {str(path)!r}: not a GGUF file (it does not start with the GGUF magic bytes)")
        _version, _tensors, count = struct.unpack("<IQQ", head[4:24])

        def string() -> str:
            (n,) = struct.unpack("<Q", f.read(8))
            return f.read(n).decode("utf-8", errors="replace")

        def skip(kind: int) -> None:
            if kind in _SCALARS:
                f.seek(struct.calcsize(_SCALARS[kind]), 1)
            elif kind == 8:
                (n,) = struct.unpack("<Q", f.read(8))
                f.seek(n, 1)
            elif kind == 9:
                inner, n = struct.unpack("<IQ", f.read(12))
                if inner in _SCALARS:
                    f.seek(n * struct.calcsize(_SCALARS[inner]), 1)
                else:
                    for _ in range(n):
                        skip(inner)
            else:
                raise UserError(f"model {str(path)!r}: unreadable GGUF metadata (value type {kind})")

        try:
            for _ in range(count):
                key = string()
                (kind,) = struct.unpack("<I", f.read(4))
                if key == "general.architecture" and kind == 8:
                    return string()
                skip(kind)
        except struct.error:
            raise UserError(f"model {str(path)!r}: the GGUF file is truncated or damaged (its metadata ends early)") from None
    return None


def load_gguf_tokenizer(src: GgufSource, revision: Optional[str] = None, trust_remote_code: bool = False):
    """The tokenizer (with its chat template) stored in the GGUF file."""
    from transformers import AutoTokenizer

    check_gguf_package(f"model {str(src)!r}")
    if src.local:
        read_architecture(src.path)  # a file that is no GGUF gets its own error
    try:
        return AutoTokenizer.from_pretrained(
            src.repo, gguf_file=src.file, revision=revision, trust_remote_code=trust_remote_code, local_files_only=src.local
        )
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"model {str(src)!r}: could not build the tokenizer stored in the GGUF file ({_first_line(e)})") from None


def load_gguf_model(src: GgufSource, dtype, revision: Optional[str] = None, trust_remote_code: bool = False, **placement):
    """The causal LM in the GGUF file, dequantized into ``dtype``: a plain dense transformers model.
    ``placement``: ``attn_implementation`` / ``device_map``, passed to ``from_pretrained``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    where = f"model {str(src)!r}"
    check_gguf_package(where)
    arch = read_architecture(src.path) if src.local else None
    kwargs = {}
    try:  # transformers >= 5.2x may keep quantized weights packed (not trainable); ask for dense ones
        from transformers.utils.quantization_config import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older releases always dequantize
        pass
    common = dict(gguf_file=src.file, revision=revision, trust_remote_code=trust_remote_code, local_files_only=src.local)
    try:
        with _legacy_loader_tuned():
            # The config read once and passed on: from_pretrained would parse the file's metadata for it twice.
            config = AutoConfig.from_pretrained(src.repo, **common)
            model = AutoModelForCausalLM.from_pretrained(src.repo, config=config, dtype=dtype, **common, **kwargs, **placement)
    except ValueError as e:
        message = str(e)
        if "architecture" in message and "not supported" in message:
            raise UserError(
                f"{where}: transformers cannot load GGUF architecture {arch or '(see the file)'!r}; "
                f"it loads {', '.join(supported_architectures())} (convert the model to safetensors, or use a newer transformers)"
            ) from None
        raise UserError(f"{where}: could not load the GGUF file ({_first_line(e)})") from None
    except (OSError, KeyError) as e:
        raise UserError(f"{where}: could not load the GGUF file ({_first_line(e)})") from None
    except ImportError as e:
        raise UserError(f"{where}: {_first_line(e)}; {INSTALL_HINT}") from None
    return _dense(model, where)


@contextmanager
def _legacy_loader_tuned() -> Iterator[None]:
    """Two things about transformers' GGUF loader for most architectures (llama among them;
    ``modeling_gguf_pytorch_utils``), for the duration of a load:

    - it shows a plain tqdm bar, which transformers' progress-bar switch does not reach: when the
      bars are off (forgetless.progress.quiet_libraries), this one is too;
    - it asks ``gguf.get_tensor_name_map(arch, n_blocks)`` once per module of the model (hundreds
      of times, a quarter of the load): the map depends only on its arguments, so it is built once.
    """
    from transformers.utils import logging as hf_logging

    try:
        import transformers.modeling_gguf_pytorch_utils as legacy
    except ImportError:  # pragma: no cover
        legacy = None
    try:
        import gguf
    except ImportError:  # pragma: no cover - checked before
        gguf = None
    saved = []
    bar = getattr(legacy, "tqdm", None)
    if bar is not None and not hf_logging.is_progress_bar_enabled():
        saved.append((legacy, "tqdm", bar))
        legacy.tqdm = functools.partial(bar, disable=True)
    name_map = getattr(gguf, "get_tensor_name_map", None)
    if name_map is not None:
        saved.append((gguf, "get_tensor_name_map", name_map))
        gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _dense(model, where: str):
    """``model`` with no GGUF quantizer attached, so that it trains and saves as safetensors."""
    import torch

    if getattr(model, "hf_quantizer", None) is None and getattr(model.config, "quantization_config", None) is None:
        return model
    if any(p.dtype in (torch.uint8, torch.int8) for p in model.parameters()):
        raise UserError(f"{where}: transformers kept the GGUF weights packed (quantized), which cannot be trained; upgrade transformers")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)  # what transformers does for dequantize=True
    for obj, name in ((model, "hf_quantizer"), (model.config, "quantization_config"), (model, "quantization_method")):
        if name in vars(obj):
            delattr(obj, name)
    for obj, name in ((model, "is_quantized"), (model.config, "_is_quantized")):
        if vars(obj).get(name):
            setattr(obj, name, False)
    return model


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
