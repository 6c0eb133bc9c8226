"""``omh-ref``: the click command line. Each command is a thin edge over the library."""
import sys
import time

import click

from omh_ref import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="omh-ref")
def main():
    """omh-ref: the reference implementation of OMH for unsupervised semantic segmentation."""


@main.command()
@click.option("--seed", default=0, show_default=True, help="Seed of the random shapes and values.")
@click.option("--only", default=None, help="Run only the checks whose name contains this text.")
def gradcheck(seed, only):
    """Check every hand-written backward pass against finite differences (float64).

    Prints one row per check (name, shapes, max relative error, tolerance, pass) and exits 1 if
    any check fails.
    """
    from omh_ref.checks import cases

    t0 = time.perf_counter()
    click.echo(f"{'check':<40} {'shapes':<34} {'max rel err':>10} {'tol':>8}  pass")
    failed = 0
    n = 0
    for name, check in cases(seed):
        if only is not None and only not in name:
            continue
        rep = check()
        n += 1
        failed += not rep.passed
        click.echo(rep.row())
    if n == 0:
        raise click.UsageError(f"--only {only!r} matches no check")
    click.echo(f"{n - failed} passed, {failed} failed in {time.perf_counter() - t0:.1f} s (seed {seed})")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
