"""`flen review`: serve the review page for the gated images of a project."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from flen_assets.commands.common import ProjectOpt, fail, resolve_project
from flen_resources.project import InvalidNameError, flen_command, validate_iteration, validate_slug


def review(character: Annotated[Optional[str], typer.Argument(help="Character to review (default: the index page).")]
           = None,
           iteration: Annotated[Optional[str], typer.Option(help="v1, v2, ... (default: the latest with pending "
                                                            "images, else the latest)")] = None,
           asset: Annotated[str, typer.Option(
               help="filtered_images, synthetic_batch or identity_reference (source photos)")] = "filtered_images",
           port: Annotated[int, typer.Option(envvar="FLEN_REVIEW_PORT", help="Port to serve on.")] = 8765,
           host: Annotated[str, typer.Option(help="Interface to bind; 127.0.0.1 keeps the page local.")] = "127.0.0.1",
           allowed_host: Annotated[Optional[list[str]], typer.Option(
               "--allowed-host", help="Another name the page may be reached by (Host header), e.g. this "
                                      "machine's DNS name when --host is not loopback; repeatable.")] = None,
           project: ProjectOpt = None) -> None:
    """Serve the review page: accept or reject gated images with the keyboard (binds 127.0.0.1)."""
    from flen_assets.review.server import serve
    from flen_assets.review.store import Partition, ReviewStore, base_url, review_url, validate_asset

    proj = resolve_project(project)
    try:
        validate_asset(asset)
        if character is not None:
            validate_slug(character)
        if iteration is not None:
            validate_iteration(iteration)
    except InvalidNameError as exc:
        fail(str(exc))
    # Serve an existing project only: `flen review` in the wrong folder must not turn it into one.
    if not (proj.lineage_dir.is_dir() and proj.data_dir.is_dir()):
        fail(f"{proj.root} is not a FLENwheel project (no .flen/lineage/ or data/): "
             "run it in a project, pass --project DIR, or create one with `flen init`")
    url = base_url(host, port) + "/"
    if character is not None:
        store = ReviewStore(proj)
        parts = [p for p in store.partitions() if p.character == character and p.asset == asset
                 and (iteration is None or p.iteration == iteration)]
        if not parts:
            from flen_assets.partitions import known_characters, unknown_character_message

            known = sorted(set(known_characters(proj)) | {p.character for p in store.partitions()})
            if character not in known:
                fail(unknown_character_message(proj, character, known))
            fail(f"no published {asset} for {character}" + (f"|{iteration}" if iteration else "")
                 + f": materialize it first ({flen_command(proj, 'materialize', character, iteration or 'v1')})")
        if iteration is None:  # newest first; prefer one that still has pending images
            parts = [p for p in parts if store.pending(p)] or parts
        part: Partition = parts[0]
        pending = store.pending(part)
        url = review_url(part.character, part.iteration, part.asset, port=port, host=host)
        typer.echo(f"{part.asset} {part.character}|{part.iteration}: {pending} image(s) pending")
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.secho(f"warning: binding {host} lets other machines make review decisions", fg=typer.colors.YELLOW)
    typer.echo(f"review page on {url}   (keys: a accept, r reject, u undo, j/k next/previous; ctrl+c to stop)")
    serve(proj, host=host, port=port, allowed_hosts=tuple(allowed_host or ()))
