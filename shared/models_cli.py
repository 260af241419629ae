"""``cit models``: parameters and forward FLOPs of every registered model builder (and any timm model asked for).

Kept outside ``shared.models`` so that listing ``cit --help`` does not import timm; the models load when the
command runs.
"""
from __future__ import annotations

import json

import click


def format_rows(rows: list[dict]) -> str:
    head = f"{'model':<16} {'kind':<8} {'params':>12} {'FLOPs/image':>14}  input"
    lines = [head, "-" * len(head)]
    for r in rows:
        stem = " small-input stem" if r.get("small_input") else ""
        lines.append(f"{r['name']:<16} {r['kind']:<8} {r['params']:>12,} {r['flops'] / 1e9:>10.3f} G  "
                     f"{r['in_chans']}x{r['img_size']}x{r['img_size']}, {r['num_classes']} classes{stem}")
    return "\n".join(lines)


@click.command("models")
@click.option("--img-size", default=224, show_default=True, type=click.IntRange(min=8), help="Input side (px).")
@click.option("--in-chans", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--num-classes", default=1000, show_default=True, type=click.IntRange(min=1))
@click.option("--timm", "timm_names", multiple=True, metavar="NAME", help="Also this timm model (repeatable).")
@click.option("--small-input/--no-small-input", default=None,
              help="timm CNNs: the 28-32 px stem [default: on for inputs up to 64 px].")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def models(img_size, in_chans, num_classes, timm_names, small_input, as_json):
    """Parameters and forward FLOPs per image of every registered model (and of --timm models)."""
    from shared.models import describe_models, is_model, list_models
    unknown = [n for n in timm_names if not is_model(n)]
    if unknown:
        raise click.BadParameter(f"{unknown[0]!r} is not a timm model name (see timm.list_models())",
                                 param_hint="--timm")
    rows = describe_models([*list_models(), *timm_names], img_size=img_size, in_chans=in_chans,
                           num_classes=num_classes, small_input=small_input)
    click.echo(json.dumps(rows, indent=2) if as_json else format_rows(rows))
