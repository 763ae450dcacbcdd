"""The options of the ``reproduce`` subcommands (private to :mod:`idefender_gpu.experiments.cli`).

Option types (argparse shows their messages as ``argument --epochs: must be ...``), the
options every experiment takes (:func:`add_common_options`) and each experiment's own
(``*_options``). Nothing here runs an experiment: :mod:`~idefender_gpu.experiments.cli`
maps parsed arguments to configs.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable

__all__ = ["MNIST_FAMILY", "add_common_options", "count_or_all", "device", "eps_list", "layer_list", "model_f_layers", "non_negative_float",
           "non_negative_int", "positive_int"]


# --------------------------------------------------------------------------------------
# Option types: argparse shows their messages as "argument --epochs: must be ..."
# --------------------------------------------------------------------------------------


def _int_at_least(low: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}; got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {what}; got {text!r}")
        return value

    parse.__name__ = what
    return parse


positive_int = _int_at_least(1, "a positive int (1, 2, ...)")
non_negative_int = _int_at_least(0, "a non-negative int (0, 1, ...)")


def count_or_all(text: str) -> int | None:
    """A positive int, or ``all`` (None)."""
    if text.lower() == "all":
        return None
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be a positive int or 'all'; got {text!r}") from None


count_or_all.__name__ = "count or 'all'"


def non_negative_float(text: str) -> float:
    """A finite float >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a float >= 0 (such as 1e-4); got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite float >= 0 (such as 1e-4); got {text!r}")
    return value


non_negative_float.__name__ = "non-negative float"


def device(text: str) -> str:
    """A torch device this machine has (``cpu``, ``cuda``, ``cuda:1``, ...)."""
    from idefender_gpu.experiments._common import check_device

    try:
        return str(check_device(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


device.__name__ = "device"


def model_f_layers(text: str) -> tuple[str, ...]:
    """Comma-separated layer specs of model F, resolved against an untrained model F."""
    from idefender_gpu.features import parse_layers
    from idefender_gpu.models import build_model

    layers = tuple(part.strip() for part in text.split(",") if part.strip())
    if not layers:
        raise argparse.ArgumentTypeError(f"must name at least one layer of model F; got {text!r}")
    model = build_model("F")
    try:
        parse_layers(model, list(layers))
    except ValueError:
        names = ", ".join(name for name, _ in model.named_modules() if name)
        raise argparse.ArgumentTypeError(
            f"must be layers of model F ({names}), each optionally with ':input' or ':output', "
            f"comma-separated and each once; got {text!r}") from None
    return layers


model_f_layers.__name__ = "layers of model F"


# --------------------------------------------------------------------------------------
# Options every experiment has, and logging of the phases
# --------------------------------------------------------------------------------------


#: the datasets most experiments take (``--dataset`` choices)
MNIST_FAMILY = ("fashion-mnist", "mnist")


def add_common_options(parser: argparse.ArgumentParser, datasets: tuple[str, ...] = MNIST_FAMILY) -> None:
    """The options every experiment takes: data, output, seed, device, progress, cache."""
    parser.add_argument("--dataset", choices=datasets, default="fashion-mnist",
                        help="the dataset (default %(default)s)")
    parser.add_argument("--data", metavar="DIR", default=None,
                        help="folder holding the dataset's files (the four IDX files; CIFAR-10's "
                             "cifar-10-batches-bin; ImageNet's root with train/ and val/, required), the only one "
                             "searched when given "
                             "(default: $IDEFENDER_DATA if set, else Debian's /usr/share/datasets/<dataset>, "
                             "then the download cache)")
    parser.add_argument("--no-download", action="store_true",
                        help="never download the dataset (without it, torchvision downloads it when no "
                             "folder is named and no local files are found)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="output folder (default results/reproduce-<dataset>, ignored by git)")
    parser.add_argument("--seed", type=non_negative_int, default=0, metavar="N",
                        help="seed of model E and of the mixtures' k-means; model F uses seed + 1 (default 0)")
    if set(datasets) <= set(MNIST_FAMILY):
        parser.add_argument("--epochs", type=positive_int, default=5, metavar="N",
                            help="training epochs of models E and F (default %(default)s)")
    else:  # the dataset's default
        parser.add_argument("--epochs", type=positive_int, default=None, metavar="N",
                            help="training epochs of the models (default 5 for model F; 200 for CIFAR-10's "
                                 "WideResNets, 1 with --stand-in)")
    parser.add_argument("--device", type=device, default=None, metavar="DEVICE",
                        help="torch device such as cpu, cuda or cuda:1 (default: cuda if available, else cpu)")
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help="CPU threads for torch (default: torch's own choice; 1 is fastest on a busy "
                             "shared machine)")
    parser.add_argument("--cache", metavar="DIR", default=None,
                        help="checkpoint folder of the trained models (default $IDEFENDER_CACHE/models or "
                             "~/.cache/idefender-gpu/models)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (bars are shown only on a terminal anyway; the one-line "
                             "phase messages stay)")
    parser.add_argument("--quiet", action="store_true",
                        help="no phase messages on stderr (errors and the final table still print)")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error")


def _subset_options(parser: argparse.ArgumentParser) -> None:
    """``--n-train`` and ``--n-test`` of the MNIST-family commands (blackbox, select)."""
    parser.add_argument("--n-train", type=positive_int, default=None, metavar="N",
                        help="use only the first N training images (default all)")
    parser.add_argument("--n-test", type=positive_int, default=None, metavar="N",
                        help="use only the first N test images (default all)")


def _blackbox_options(parser: argparse.ArgumentParser) -> None:
    _subset_options(parser)
    parser.add_argument("--n-other", type=count_or_all, default=1000, metavar="N",
                        help="test images attacked in every setting but black-box FGSM (BIM, L2, DeepFool, "
                             "semi-white-box): at most the first N of the evaluation set, or 'all' "
                             "(default 1000)")
    parser.add_argument("--n-calibrate", type=count_or_all, default=10000, metavar="N",
                        help="training images that set the ID-99 thresholds: at most the first N, or 'all' "
                             "(default 10000)")
    parser.add_argument("--substitute", choices=("jacobian", "trained"), default="jacobian",
                        help="model E: Papernot's substitute trained from --holdout test images with labels "
                             "queried from F (Defense-GAN's black-box setting; default), or trained on the "
                             "training set with the true labels")
    parser.add_argument("--holdout", type=positive_int, default=150, metavar="N",
                        help="test images the attacker holds (jacobian substitute), left out of the evaluation; "
                             "must be smaller than the test images in use (default %(default)s)")
    parser.add_argument("--n-holdout", type=non_negative_int, default=1000, metavar="N",
                        help="the last N test images in use calibrate the ID-95 / ID-99 thresholds (held-out "
                             "natural data) and are left out of the evaluation; 0: training-data thresholds "
                             "(default %(default)s)")
    parser.add_argument("--layers", type=model_f_layers, default=("conv2",), metavar="LAYERS",
                        help="comma-separated layers of model F whose hidden states I-defender models "
                             "(default conv2: its second convolution before the ReLU; e.g. fc:input, "
                             "conv2,fc)")
    parser.add_argument("--components", type=positive_int, default=1, metavar="K",
                        help="Gaussian mixture components per class (default %(default)s)")
    parser.add_argument("--covariance", choices=("full", "tied", "diag", "spherical"), default="full",
                        help="covariance type of the mixtures, as in scikit-learn's GaussianMixture "
                             "(default %(default)s)")
    parser.add_argument("--reg-covar", type=non_negative_float, default=1e-4, metavar="FLOAT",
                        help="added to the diagonal of every covariance, >= 0 (default %(default)g)")
    parser.add_argument("--batch-size", type=positive_int, default=500, metavar="N",
                        help="attack and scoring batch size (default %(default)s)")
    parser.add_argument("--threat", choices=("both", "black-box", "semi-white-box"), default="both",
                        help="threat models: black-box (attacks crafted on model E), semi-white-box (on "
                             "model F's own gradients, no knowledge of the detector), or both (default)")
    parser.add_argument("--ablation", action="store_true",
                        help="also compare detector variants (layers, K, covariance) on black-box FGSM")


def _protocol_options(parser: argparse.ArgumentParser, n_attack: int = 1000) -> None:
    """The options of the three protocols (their shared config, ``ProtocolConfig``)."""
    parser.add_argument("--n-train", type=positive_int, default=None, metavar="N",
                        help="use only the first N training images (ImageNet: a seeded random N; default all)")
    parser.add_argument("--n-test", type=positive_int, default=None, metavar="N",
                        help="use only the first N test images (ImageNet: a seeded random N of val; default all)")
    parser.add_argument("--n-holdout", type=_int_at_least(10, "an int >= 10"), default=2000, metavar="N",
                        help="the last N test images in use calibrate the held-out thresholds (ImageNet: a seeded "
                             "share of val, stratified, every class held out; default %(default)s, ImageNet 25000: 25 "
                             "per class); the rest is the evaluation set")
    parser.add_argument("--n-attack", type=count_or_all, default=n_attack, metavar="N",
                        help="evaluation images attacked: the first N, or 'all' (default %(default)s)")
    parser.add_argument("--n-calibrate", type=count_or_all, default=10000, metavar="N",
                        help="training images that set the training-data ID-99 thresholds (default 10000)")
    parser.add_argument("--layers", type=layer_list, default=None, metavar="LAYERS",
                        help="comma-separated layers whose hidden states I-defender models (default: the "
                             "dataset's, conv2 of model F, fc:input of a WideResNet)")
    parser.add_argument("--components", type=positive_int, default=1, metavar="K",
                        help="Gaussian mixture components per class (default %(default)s)")
    parser.add_argument("--covariance", choices=("full", "tied", "diag", "spherical"), default="full",
                        help="covariance type of the mixtures (default %(default)s)")
    parser.add_argument("--reg-covar", type=non_negative_float, default=1e-4, metavar="FLOAT",
                        help="added to the diagonal of every covariance, >= 0 (default %(default)g)")
    parser.add_argument("--batch-size", type=positive_int, default=500, metavar="N",
                        help="attack, scoring and loader batch size (default %(default)s; ImageNet 64)")
    parser.add_argument("--workers", type=non_negative_int, default=None, metavar="N",
                        help="ImageNet only: DataLoader worker processes reading the images (default min(8, "
                             "CPUs), 0 with --stand-in; 0: in the main process)")


def _stand_in_options(parser: argparse.ArgumentParser, roles: str) -> None:
    """``--stand-in`` and ``--weights`` (the protocols that run on CIFAR-10)."""
    parser.add_argument("--stand-in", action="store_true",
                        help="CIFAR-10 and ImageNet only: seeded random images of its shapes, narrow WideResNets "
                             "(wrn-10-1, wrn-16-1) trained for one epoch (ImageNet: VGG19/8s, four epochs, on 10 "
                             "classes of 64 x 64 crops), 16 attacked images, tiny search budgets: proves the "
                             "pipeline end to end in seconds, reproduces nothing (report.md says so first)")
    parser.add_argument("--weights", metavar="FILE", action="append", default=None,
                        help=f"a checkpoint of {roles} (idefender-gpu train's model.safetensors); repeat it "
                             "for the next model, in that order; models without one are loaded from the cache "
                             "or trained")


def _semiwhitebox_options(parser: argparse.ArgumentParser) -> None:
    _protocol_options(parser)
    _stand_in_options(parser, "the model")
    parser.add_argument("--tolerance", type=non_negative_float, default=0.005, metavar="FLOAT",
                        help="bisection stops within this of the target adversarial accuracy (default %(default)s)")


def _graybox_options(parser: argparse.ArgumentParser) -> None:
    _protocol_options(parser)
    _stand_in_options(parser, "Source, Target, then Wide (the bigger network; ImageNet: Source and Target, "
                              "VGG19 files such as torchvision's vgg19-dcbb9e9d.pth, both required)")
    parser.add_argument("--no-wide", action="store_true",
                        help="skip the wider network (Table 8's analogue)")
    parser.add_argument("--eps-scale", type=_positive_float, default=1.0, metavar="S",
                        help="divide every gray-box eps by S (default 1: eps on [0, 1] pixels; e.g. 255 reads "
                             "ImageNet's Table 9 eps as grey levels, a scale the paper does not state)")


def _positive_float(text: str) -> float:
    """A finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite float > 0 (such as 255); got {text!r}")
    return value


_positive_float.__name__ = "positive float"


def layer_list(text: str) -> tuple[str, ...]:
    """Comma-separated layer specs (checked against the dataset's models by the config)."""
    layers = tuple(part.strip() for part in text.split(",") if part.strip())
    if not layers:
        raise argparse.ArgumentTypeError(f"must name at least one layer; got {text!r}")
    return layers


layer_list.__name__ = "layer list"


def _eps_value(part: str) -> float:
    """A float, or a fraction such as ``8/255``."""
    if "/" in part:
        numerator, denominator = part.split("/", 1)
        return float(numerator) / float(denominator)
    return float(part)


def eps_list(text: str) -> tuple[float, ...]:
    """Comma-separated Linf radii in (0, 1], each a float or a fraction (``8/255``)."""
    try:
        values = tuple(_eps_value(part.strip()) for part in text.split(",") if part.strip())
    except (ValueError, ZeroDivisionError):
        values = ()
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"must be comma-separated floats or fractions in (0, 1] such as "
                                         f"0.1,0.3 or 4/255,8/255; got {text!r}")
    return values


eps_list.__name__ = "eps list"


def _adaptive_options(parser: argparse.ArgumentParser) -> None:
    _protocol_options(parser, n_attack=500)
    _stand_in_options(parser, "the model")
    parser.add_argument("--eps", type=eps_list, default=None,
                        metavar="EPS", help="comma-separated Linf radii on [0, 1] pixels, floats or fractions "
                                            "(default: the dataset's: 0.05,0.1,0.2,0.3 on Fashion-MNIST / MNIST; "
                                            "2/255,4/255,8/255,16/255 on CIFAR-10, also with --stand-in; "
                                            "1/255,2/255,4/255,8/255 on ImageNet)")
    parser.add_argument("--steps", type=positive_int, default=40, metavar="N",
                        help="steps per attack run (default %(default)s; 2 with --stand-in)")
    parser.add_argument("--restarts", type=positive_int, default=1, metavar="N",
                        help="MarginPGD's random restarts per loss (default %(default)s)")
    parser.add_argument("--targets", type=non_negative_int, default=3, metavar="N",
                        help="MarginPGD's targeted runs (default %(default)s; 1 with --stand-in)")
    parser.add_argument("--no-external", action="store_true",
                        help="do not run torchattacks' and ART's PGD beside MarginPGD")


def _select_options(parser: argparse.ArgumentParser) -> None:
    _subset_options(parser)
    parser.add_argument("--n-validation", type=_int_at_least(10, "an int >= 10"), default=10000, metavar="N",
                        help="the last N training images are the validation split (default %(default)s)")
    parser.add_argument("--select-epochs", type=_int_list, default=None, metavar="N,N",
                        help="training lengths of model F compared (default: --epochs alone)")
    parser.add_argument("--holdout", type=positive_int, default=150, metavar="N",
                        help="test images the attacker's substitute is trained from (default %(default)s)")
    parser.add_argument("--n-holdout", type=non_negative_int, default=1000, metavar="N",
                        help="held-out test images of the test run's thresholds (default %(default)s)")
    parser.add_argument("--no-test", action="store_true", help="choose only: no test-set run")
    parser.add_argument("--batch-size", type=positive_int, default=500, metavar="N",
                        help="attack and scoring batch size (default %(default)s)")


def _int_list(text: str) -> tuple[int, ...]:
    """Comma-separated positive ints."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be comma-separated positive ints such as 5,10; got {text!r}")
    return values


_int_list.__name__ = "int list"


def _all_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n-train", type=positive_int, default=None, metavar="N",
                        help="use only the first N training images in every experiment (default all)")
    parser.add_argument("--n-test", type=positive_int, default=None, metavar="N",
                        help="use only the first N test images in every experiment (default all)")
