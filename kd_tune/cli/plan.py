"""``kd-tune plan``: a search space's trials (or packs) and their cost in student epochs; nothing runs."""

from __future__ import annotations

from dataclasses import replace

from kd_tune.cli.args import PlanArgs
from kd_tune.space.methods import METHODS
from kd_tune.space.options import SweepOptions, apply_overrides
from kd_tune.space.parse import load_space
from kd_tune.space.schema import SweepSpec


def show_plan(args: PlanArgs) -> int:
    """Validate a search space and print its trials (or packs) and their cost in student epochs (nothing runs)."""
    space = args.space
    spec = load_space(space)
    if args.no_share_epochs:
        spec = replace(spec, share_epochs=False)
    if args.pack is not None:
        spec = apply_overrides(spec, SweepOptions(pack=args.pack))
    shared, separate = replace(spec, share_epochs=True), replace(spec, share_epochs=False)
    precision = None if spec.student.precision == "float32" else f"students train in {spec.student.precision}"
    if spec.is_search:
        from kd_tune.sweep.search import describe  # imports Ray Tune: only for a search

        print(f"{space}: sweep {spec.name!r}, a search: {spec.search.num_samples} student trials sampled by Ray Tune"
              f"{f', plus {len(spec.trials())} baseline trials' if spec.trials() else ''}{f' ({precision})' if precision else ''}")
        print("\n".join(describe(spec)))
    else:
        n = len(spec.packs()) if spec.packed else len(spec.trials())
        trials = f"{n} {'packed ' if spec.packed else ''}trial{'' if n == 1 else 's'}" + (f" of up to {spec.resources.pack_size} students" if spec.packed else "")
        print(f"{space}: sweep {spec.name!r}, {len(spec.grid_points())} grid points, {trials} "
              f"(epoch sharing {'on' if spec.share_epochs else 'off'}{f'; {precision}' if precision else ''})")
    for line in model_lines(spec) + method_lines(spec):
        print(line)
    if spec.packed:
        packs = spec.packs()
        why = ("resources.pack / --pack" if spec.resources.pack is not None else
               f"resources.pack unset: {spec.resources.pack_size} when trials get a GPU, as resources.gpu {spec.resources.gpu:g} asks; "
               "--pack 1 for one student per trial")
        print(f"{len(spec.trials())} students in {len(packs)} pack{'' if len(packs) == 1 else 's'} ({why}), each pack one trial and one model:")
        for i, members in enumerate(packs, 1):
            print(f"  pack {i}: {len(members)} students, trains {members[0].epochs} epochs: {', '.join(t.label for t in members)}")
    else:
        for t in spec.trials():
            print(f"  {t.label:<32} trains {t.epochs} epochs, reports {', '.join(map(str, t.milestones))}")
    saved = separate.student_epochs() - shared.student_epochs()
    repeated = spec.repeated_trainings()
    if repeated:
        again = sum(len(g) - 1 for g in repeated)
        shown = "; ".join(" = ".join(t.label for t in g) for g in repeated[:2]) + ("; ..." if len(repeated) > 2 else "")
        print(f"note: {again} trial{'s' if again > 1 else ''} ({sum(t.epochs for g in repeated for t in g[1:])} student epochs) train{'' if again > 1 else 's'} "
              f"the same weights as another: alpha 1 leaves the teacher out, so alpha 1 at any T is the scratch student of its seed "
              f"({shown})")
    if spec.is_search:
        print(f"student epochs: at most {spec.student_epochs()} ({spec.search.num_samples} x {max(spec.grid.epochs)} for the search"
              f"{', fewer as the scheduler stops trials' if spec.scheduler and not spec.scheduler.population else ''}; {shared.student_epochs() - spec.search.num_samples * max(spec.grid.epochs)} "
              f"for the baselines)")
        return 0
    print(f"student epochs: {spec.student_epochs()} (with sharing {shared.student_epochs()}, without {separate.student_epochs()}: "
          f"sharing saves {saved}, {saved / separate.student_epochs():.0%})")
    return 0


def model_lines(spec: SweepSpec) -> list[str]:
    """The sweep's students and teachers (each ``grid.student`` / ``grid.teacher`` entry by name), and which do not pack."""
    lines = []
    for name, student in spec.students().items():
        lines.append(f"student{f' {name}' if name else ''}: {student.model.describe()}, lr {student.lr:g}, batch {student.batch_size}")
    for name, teacher in spec.teachers().items():
        what = (f"pre-trained, from {teacher.source}" if teacher.source is not None else
                f"{teacher.model.describe()}, {teacher.epochs} epochs" + (f", augment {teacher.augment}" if teacher.augment != "none" else "")
                + (f", ensemble of {teacher.ensemble}" if teacher.ensemble > 1 else ""))
        lines.append(f"teacher{f' {name}' if name else ''}: {what}")
    for name in spec.unpacked_students():
        arch = spec.students()[name].arch
        lines.append(f"note: students of {arch}{f' (grid.student.{name})' if name else ''} do not pack: one per trial")
    return lines


def method_lines(spec: SweepSpec) -> list[str]:
    """The ``grid.method`` axis of a grid: each method, how many grid points it has and how it weights its distillation."""
    if not spec.grid.method or spec.is_search:
        return []
    points = [p for p in spec.grid_points() if p.role == "student"]
    lines = ["methods (each point's knobs are in its label; left out: the method's defaults):"]
    for name in dict.fromkeys(p.variant for p in points):
        mine = [p for p in points if p.variant == name]
        lines.append(f"  {name}: {len(mine)} grid point{'' if len(mine) == 1 else 's'}; distillation weighted by {METHODS[mine[0].method].distill_weight}")
    return lines
