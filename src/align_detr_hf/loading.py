"""Loading a trained detector for the commands that run one (`align-detr predict`, `evaluate`, `export`): a model
folder or a Hub id, its image processor, and one-line errors naming what was looked for."""

import os
import sys
from pathlib import Path


def _flat(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _looks_like_path(name: str) -> bool:
    """A Hub id is `name` or `owner/name`; anything else (absolute, ./, ~, backslashes, several slashes) is a path."""
    return (
        name.startswith((".", "/", "~"))
        or "\\" in name
        or name.count("/") > 1
        or os.path.isabs(name)
        or name.endswith("/")
    )


def load_detector(model: str, device: str = "cpu", command: str = "align-detr"):
    """Load (image processor, model in eval mode on `device`) from a local folder or a Hub id, with one-line errors
    that say what was looked for. Without a preprocessor_config.json the processor's defaults are used, with a note
    on stderr that starts with `command`."""
    from transformers import AutoConfig, AutoModelForObjectDetection
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    from .image_processing_align_detr import AlignDetrImageProcessor

    if not model.strip():
        raise ValueError("--model is empty; give a model folder or a Hub id.")
    local = Path(model).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise FileNotFoundError(
                f"model folder {local.resolve()} has no config.json; expected a folder written by "
                "`save_pretrained` or `align-detr convert` (config.json + model.safetensors)."
            )
        source = str(local)
    elif local.exists():
        raise ValueError(f"--model {model}: {local.resolve()} is a file; pass the folder that holds config.json.")
    elif _looks_like_path(model):
        raise FileNotFoundError(f"model folder not found: {local.resolve()} (from --model {model}).")
    else:
        source = model

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    config = None
    try:
        config = AutoConfig.from_pretrained(source)
        detector = AutoModelForObjectDetection.from_pretrained(source, config=config)
    except (RuntimeError, TypeError) as error:  # e.g. a hand-edited config.json whose shapes the weights do not fit
        where = local.resolve() if local.is_dir() else f"'{model}'"
        raise ValueError(f"could not load the model {where}: its config.json and weights do not fit together or "
                         f"config.json is malformed ({type(error).__name__}: {_flat(error)})") from error
    except ValueError as error:
        if config is not None:
            raise
        # the config's own checks (AlignDetrConfig refuses a value out of range): name the file
        where = local.resolve() / "config.json" if local.is_dir() else f"config.json of '{model}'"
        raise ValueError(f"{where}: {_flat(error)}") from error
    except OSError as error:
        first_line = (str(error).strip().splitlines() or [""])[0]
        if local.is_dir():
            raise ValueError(f"could not load the model in folder {local.resolve()}: {first_line}") from error
        if offline:
            hint = (
                "HF_HUB_OFFLINE is set, so only the local Hugging Face cache was searched and it has no copy; "
                "unset HF_HUB_OFFLINE (with network access) to download it, or pass a local folder"
            )
        else:
            hint = "check the spelling, the network, and for private models `hf auth login`"
        raise FileNotFoundError(
            f"could not load model '{model}': there is no folder {local.resolve()}, and as a Hugging Face Hub id "
            f"it could not be loaded ({hint}). Cause: {first_line}"
        ) from error
    try:
        processor = AutoImageProcessor.from_pretrained(source)
    except Exception as error:  # noqa: BLE001 -- whatever it is, it is reported with the file it came from
        if local.is_dir():
            found = local.resolve() / "preprocessor_config.json"
            found = str(found) if found.is_file() else None
        else:  # a Hub model: the file is in the cache if the repository has one
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(source, "preprocessor_config.json")
        if isinstance(found, str):  # a file that is there but wrong is an error, not a reason to use other settings
            raise ValueError(f"{found} is not a valid image processor config: {_flat(error)}") from error
        print(
            f"{command}: note: no image processor config in '{model}'; using AlignDetrImageProcessor() "
            "defaults (mmdetection's test pipeline).",
            file=sys.stderr,
        )
        processor = AlignDetrImageProcessor()
    return processor, detector.to(device).eval()
