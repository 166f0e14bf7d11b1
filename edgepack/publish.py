"""Publishing a bundle: ``export`` writes a folder for the Hugging Face hub or for Ollama, ``push`` uploads the former.

Layouts, each written under a temporary name and renamed when complete::

    hf:      OUT/README.md                   the model card (``modelcard.py``)
             OUT/edgepack.json, edgepack.sig the manifest byte for byte, and its signature when signed
             OUT/variants/, calibration/, eval/, report/   as in the bundle
    ollama:  OUT/<variant-id>/Modelfile      one per GGUF variant (``ollama.py``)
             OUT/<variant-id>/<file>.gguf    the variant's file

The hub folder is itself a bundle (``edgepack chat`` loads it after a download) without ``reference/``:
the float model it was scored against has its own repository, and the manifest keeps its hashes.
The manifest is not rewritten, so a signed bundle's signature stays valid; the export is checked
against it (or, unsigned, against the manifest's hashes) before it is renamed into place. Files come
as hard links where the file system allows, else as copies.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from . import constants, library
from .bundle import CALIBRATION, MANIFEST, Bundle
from .errors import BundleError, HubAuthError, MissingDependencyError, OfflineError, PublishError, SignatureError, UsageError
from .eval_reference import EVAL_DIR
from .fsutil import atomic_dir, link_or_copy, sha256_file
from .report import REPORT_DIR

log = logging.getLogger(__name__)
FORMATS = ("hf", "ollama")
_REPO_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")


def export(bundle: Bundle | str | Path, out: str | Path, *, format: str, repo_id: str | None = None) -> Path:
    """Write ``bundle`` as ``format`` (hf or ollama) into the new or empty folder ``out``; return ``out``.

    ``repo_id`` names the hub repository in the model card's download line. Raises UsageError (unknown
    format, ``out`` not empty or inside the bundle, no GGUF variant for ollama), BundleError (not a
    bundle, a file that does not match the manifest), SignatureError (a signature that no longer verifies).
    """
    if format not in FORMATS:
        raise UsageError(f"unknown export format {format!r}: choose {' or '.join(FORMATS)}", option="format")
    b = bundle if isinstance(bundle, Bundle) else library.open_bundle(bundle)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not empty: choose a new or empty folder", option="out")
    if b.root.resolve() in [out.resolve(), *out.resolve().parents]:
        raise UsageError(f"{out} is inside the bundle {b.root}: choose a folder outside it", option="out")
    with atomic_dir(out) as tmp:
        if format == "hf":
            _hub_folder(b, tmp, repo_id)
        else:
            _ollama_folder(b, tmp)
    return out


def _hub_folder(b: Bundle, tmp: Path, repo_id: str | None) -> None:
    from . import modelcard
    from .trust import SIGNATURE, status

    for v in [*b.data["variants"], *b.data.get("drafts", [])]:
        for f in v["files"]:
            link_or_copy(b.resolve(f["path"]), tmp / f["path"])
    for folder in (CALIBRATION, EVAL_DIR, REPORT_DIR):
        for src in sorted(p for p in (b.root / folder).rglob("*") if p.is_file()):
            link_or_copy(src, tmp / src.relative_to(b.root))
    shutil.copyfile(b.root / MANIFEST, tmp / MANIFEST)  # the bytes the signature covers
    if (b.root / SIGNATURE).exists():
        shutil.copyfile(b.root / SIGNATURE, tmp / SIGNATURE)
        signature = status(tmp)
        if signature is not None and not signature["verified"]:
            raise SignatureError(f"{b.root} is signed but does not verify ({signature['problem']}): sign it again with "
                                 f"`edgepack sign {b.root} --key KEY`, or delete {SIGNATURE} to publish it unsigned")
    else:
        signature = None
        Bundle.open(tmp, verify=True)  # raises BundleError naming a file whose sha256 is not the manifest's
    ggufs = [b.resolve(v.path) for v in b.variants if v.format == "gguf"]
    plots = [p.name for p in (tmp / REPORT_DIR).glob("*.svg")]
    text = modelcard.render(b.data, license=modelcard.license_of(b.data, b.reference(), ggufs), signature=signature,
                            plots=plots, repo_id=repo_id)
    (tmp / "README.md").write_text(text, encoding="utf-8")


def _ollama_folder(b: Bundle, tmp: Path) -> None:
    from .ollama import modelfile

    ggufs = [v for v in b.variants if v.format == "gguf"]
    if not ggufs:
        have = ", ".join(v.id for v in b.variants) or "none"
        raise UsageError(f"bundle {b.root} has no GGUF variant (it has: {have}); Ollama runs GGUF files: convert one with --to gguf:Q4_K_M")
    reference = b.reference()
    config = reference / "generation_config.json" if reference else None
    generation = json.loads(config.read_text()) if config and config.is_file() else None
    for v in ggufs:
        src = b.resolve(v.path)
        record = next(f for f in v.files if b.resolve(f["path"]) == src)
        if sha256_file(src) != record["sha256"]:
            raise BundleError(f"variant {v.id}: {record['path']} does not match its sha256: re-run the conversion")
        link_or_copy(src, tmp / v.id / src.name)
        text, note = modelfile(src, f"./{src.name}", name=b.name, variant=v.id, generation_config=generation)
        (tmp / v.id / "Modelfile").write_text(text, encoding="utf-8")
        if note:
            log.info(note)


def push(bundle: Bundle | str | Path, repo_id: str, *, private: bool = False, revision: str | None = None) -> str:
    """Export ``bundle`` for the hub and upload it to the model repository ``repo_id`` (created if new); return the commit URL.

    ``revision`` uploads to that branch (created from main if new). The endpoint and token are huggingface_hub's
    (``HF_ENDPOINT``, ``HF_TOKEN`` or ``hf auth login``). Raises UsageError (a malformed repo id), OfflineError
    (HF_HUB_OFFLINE is set), HubAuthError (no token, or one the hub refuses), PublishError (the upload failed),
    MissingDependencyError, and what ``export`` raises; nothing is uploaded unless the export is complete.
    """
    if not _REPO_ID.match(repo_id):
        raise UsageError(f"{repo_id!r} is not a hub repository id: give ORG/NAME (your user name or an organisation, then the model's name)")
    if constants.hf_offline():
        raise OfflineError("HF_HUB_OFFLINE is set and push uploads to the hub: unset it, or `edgepack export BUNDLE --format hf` now and upload later")
    try:
        import huggingface_hub
        from huggingface_hub import errors as hf_errors
    except ImportError as e:
        raise MissingDependencyError("huggingface_hub", extra="publish", purpose="edgepack push") from e
    token = huggingface_hub.get_token()
    if not token:
        raise HubAuthError("no Hugging Face token: run `hf auth login` or set HF_TOKEN to a token with write access, then push again")
    b = bundle if isinstance(bundle, Bundle) else library.open_bundle(bundle)
    constants.home().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="push-", dir=constants.home()) as tmp:  # the home: links, not copies, for its bundles
        folder = export(b, Path(tmp) / b.name, format="hf", repo_id=repo_id)
        api = huggingface_hub.HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", revision=revision,
                                     commit_message=f"edgepack push: {b.name}, {len(b.variants)} variants")
        except hf_errors.HfHubHTTPError as e:
            raise _hub_error(e, repo_id) from e
        except hf_errors.OfflineModeIsEnabled as e:
            raise OfflineError(f"huggingface_hub is in offline mode ({e}): unset HF_HUB_OFFLINE and push again") from e
        except Exception as e:  # the network, the endpoint: huggingface_hub raises its HTTP client's errors unwrapped
            raise PublishError(f"uploading to {repo_id} failed ({type(e).__name__}: {e}): check the network and HF_ENDPOINT, then push again") from e
    return str(info.commit_url)


def _hub_error(e: Any, repo_id: str) -> Exception:
    code = getattr(getattr(e, "response", None), "status_code", None)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if code in (401, 403):
        return HubAuthError(f"the hub refused the token for {repo_id} ({code}: {first}): use a token with write access to {repo_id.split('/')[0]}")
    return PublishError(f"the hub refused the upload to {repo_id} ({first}): fix what it says, then push again")
