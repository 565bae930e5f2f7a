"""What a sweep checks of its models before anything starts: every student and trained teacher builds and maps the
dataset's images to its classes (a user's own factory imported, as it will be on every node), and a pre-trained
teacher's file loads (``weights_only``) and fits the dataset. A failure is one line naming the key, exit 2, with
nothing started and nothing written.

Only spaces that need it pay for it: the study's CNN fits any image, so a space of ``cnn`` models alone skips this
(and the second torch takes to import before Ray starts).
"""

from __future__ import annotations

from kd_tune.data.registry import REGISTRY
from kd_tune.errors import SpaceError, first_line
from kd_tune.space.schema import SweepSpec
from kd_tune.space.sections import PRETRAINED_ALLOWED, ModelSpec, is_model_uri


def data_shape(spec: SweepSpec, source: str = "") -> tuple[tuple[int, int, int], int]:
    """(image shape, classes) of the sweep's data: the registry's facts, or your own data's files (their headers only).

    For your own data, also what the spec could not check: that it fits in memory, and that ``train_size`` and
    ``val_size`` fit its images. Raises :class:`~kd_tune.errors.SpaceError` naming the key."""
    ds = spec.dataset
    if ds.path is None:
        info = REGISTRY[ds.name]
        return info.shape, info.num_classes
    from kd_tune.data.custom import DataError, check_fits, describe

    try:
        layout = describe(ds.path, ds.test_split)
        check_fits(ds.path, layout, ds.max_gb)
    except DataError as e:
        raise SpaceError(source, "dataset.path", ds.path, f"{e.allowed} (there: {e.problem})") from None
    train = layout.train_count - (round(ds.test_split * layout.train_count) if layout.test_count == 0 else 0)
    classes = len(layout.classes)
    if ds.val_size > train - classes:
        raise SpaceError(source, "dataset.val_size", ds.val_size, f"an integer in [0, {train - classes}] (of the {train} training images of "
                                                                 f"{ds.path}, what is left must hold one image per class)")
    if ds.train_size is not None and ds.train_size > train - ds.val_size:
        raise SpaceError(source, "dataset.train_size", ds.train_size, f"an integer in [1, {train - ds.val_size}] (the training images of "
                                                                     f"{ds.path} left after the {ds.val_size} held out for validation)")
    return layout.shape, classes


def needs_checks(spec: SweepSpec) -> bool:
    models = [s.model for s in spec.students().values()] + [t.model for t in spec.teachers().values() if t.source is None]
    return (any(m.arch != "cnn" for m in models) or any(t.source is not None for t in spec.teachers().values())
            or spec.dataset.path is not None)


def check_models(spec: SweepSpec, source: str, tracking_uri: str) -> None:
    """Raises :class:`~kd_tune.errors.SpaceError` (file ``source``) for the first model that does not fit the dataset."""
    if not needs_checks(spec):
        return
    from kd_tune.distill.models import build, model_args
    from kd_tune.distill.pretrained import check_outputs, load_model

    shape, classes = data_shape(spec, source)

    def check(key: str, model: ModelSpec) -> None:
        try:
            check_outputs(build(model_args(model.arch, model.kwargs(), shape, classes), seed=0), shape, classes)
        except Exception as e:  # noqa: BLE001 - a factory may raise anything: the user gets its first line
            raise SpaceError(source, f"{key}.arch", model.arch, f"a model for {spec.dataset.name}'s {classes} classes of "
                                                                 f"{'x'.join(map(str, shape))} images: {first_line(e)[:300]}") from None

    for name, student in spec.students().items():
        check(f"grid.student.{name}" if name else "student", student.model)
    for name, teacher in spec.teachers().items():
        key = f"grid.teacher.{name}" if name else "teacher"
        if teacher.source is None:
            check(key, teacher.model)
            continue
        try:
            if is_model_uri(teacher.source):
                from kd_tune.tracking.model_uri import fetch

                model, _ = load_model(fetch(teacher.source, tracking_uri))
            else:
                model, _ = load_model(teacher.source)
            check_outputs(model, shape, classes)
        except ValueError as e:
            raise SpaceError(source, f"{key}.from", teacher.source, f"{PRETRAINED_ALLOWED} for {spec.dataset.name}: {first_line(e)[:300]}") from None


def run_params(spec: SweepSpec) -> dict[tuple[str, str], dict[str, object]]:
    """The params every MLflow run of a grid point starts from (:meth:`SweepSpec.run_params`), each with its student's size,
    ``student.parameters`` (what the reports plot student capacity against)."""
    import torch

    from kd_tune.distill.models import count_parameters, factory_of

    shape, classes = data_shape(spec)
    sizes = {}
    for name, student in spec.students().items():
        with torch.device("meta"):  # shapes only: no memory, no random draws
            model = factory_of(student.arch)(in_shape=shape, num_classes=classes, **student.arch_args)
        sizes[name] = count_parameters(model)
    return {key: {**params, "student.parameters": sizes[key[0]]} for key, params in spec.run_params().items()}
