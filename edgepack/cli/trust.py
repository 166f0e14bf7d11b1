"""keygen, sign, verify: each validates flags and calls one function of ``edgepack.trust``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from . import info


def register(app: typer.Typer) -> None:
    @app.command()
    def keygen(
        key: Path = typer.Argument(..., help="Where the private key goes; the public key goes beside it as KEY.pub."),
        name: str = typer.Option("", "--name", help="Who signs with it, shown by verify and the report (e.g. 'Acme models')."),
    ) -> None:
        """Make an Ed25519 signing key: KEY (private, readable by you only) and KEY.pub (give this to those who load your bundles).

        Example: edgepack keygen ~/.config/edgepack/acme.key --name "Acme models"
        """
        from ..trust import keygen as make

        public = make(key, name)
        info(f"private key: {key} (keep it secret); public key: {key}.pub")
        print(public.line())

    @app.command()
    def sign(
        bundle: str = typer.Argument(..., help="A bundle name or folder."),
        key: Path = typer.Option(..., "--key", help="The private key file `edgepack keygen` wrote.", show_default=False),
    ) -> None:
        """Sign BUNDLE: hash every file, check it against the manifest, and write edgepack.sig over the manifest.

        Sign last: eval changes the manifest (bench does not), so sign again after it.

        Example: edgepack sign out/smollm2 --key ~/.config/edgepack/acme.key
        """
        from ..trust import sign as do_sign

        signer = do_sign(bundle, key)
        info(f"signed {bundle} as {signer.who()}")

    @app.command()
    def verify(
        bundle: str = typer.Argument(..., help="A bundle name or folder."),
        trusted: list[Path] = typer.Option(
            [], "--trusted", help="A .pub file (or a file of public key lines) of a key you trust; repeatable. Without it any valid signature passes."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ) -> None:
        """Check that BUNDLE's files and manifest are exactly what was signed, and (with --trusted) who signed it.

        Exits 1 naming the first file that differs, an unsigned bundle, or a signer not among --trusted.

        Example: edgepack verify downloads/smollm2 --trusted acme.key.pub
        """
        from ..trust import verify as check

        v = check(bundle, trusted or None)
        if as_json:
            print(json.dumps({"signer": v.signer.name, "key_id": v.signer.key_id, "files": v.files, "bytes": v.bytes}, indent=2))
        else:
            print(f"verified: signed by {v.signer.who()}; {v.files} files, {v.bytes / 1e6:.1f} MB match")
