"""3D clean-up of a predicted organ mask: MONAI's largest-connected-component and hole filling, by name.

Slices are predicted one by one, so a query mask can hold small islands (a support-shaped blob on a
neighbouring structure) and holes that no organ has. An organ is one solid 3D object, which these steps
enforce. The step names are what a model folder's ``model_config.json`` and the command line store.
"""

from __future__ import annotations

__all__ = ["POSTPROCESS_STEPS", "OrganMaskPostprocess", "SplitProbabilityd", "check_postprocess_steps"]

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.data import MetaTensor
from monai.transforms import FillHoles, KeepLargestConnectedComponent, MapTransform, Transform

#: Step names in the order they run: islands are dropped before holes are filled.
POSTPROCESS_STEPS: tuple[str, ...] = ("largest_component", "fill_holes")


def check_postprocess_steps(steps: Sequence[str] | str | None) -> tuple[str, ...]:
    """The steps as a tuple in :data:`POSTPROCESS_STEPS` order; ``None``, ``"none"`` or ``[]`` mean none.

    Raises
    ------
    ValueError
        For an unknown step name (listing the known ones).
    """
    if steps is None:
        return ()
    if isinstance(steps, str):
        steps = [] if steps == "none" else [steps]
    steps = [str(s) for s in steps if s != "none"]
    unknown = sorted(set(steps) - set(POSTPROCESS_STEPS))
    if unknown:
        raise ValueError(f"unknown post-processing step(s) {unknown}; choose from {list(POSTPROCESS_STEPS)} or 'none'.")
    return tuple(s for s in POSTPROCESS_STEPS if s in steps)


class OrganMaskPostprocess(Transform):
    """Apply the named clean-up steps to a binary organ mask.

    Parameters
    ----------
    steps
        Names from :data:`POSTPROCESS_STEPS`: ``"largest_component"`` keeps the largest 26-connected 3D component
        (MONAI ``KeepLargestConnectedComponent``), ``"fill_holes"`` fills background fully enclosed by the organ
        in 3D (MONAI ``FillHoles``). Empty: the mask is returned unchanged.
    """

    def __init__(self, steps: Sequence[str] | str | None = ()) -> None:
        self.steps = check_postprocess_steps(steps)
        self._transforms = {
            "largest_component": KeepLargestConnectedComponent(applied_labels=[1], is_onehot=False),
            "fill_holes": FillHoles(applied_labels=[1]),
        }

    def __call__(self, mask: torch.Tensor) -> torch.Tensor:
        """Clean up ``mask``.

        Parameters
        ----------
        mask
            ``[1, H, W, D]`` (channel first) or ``[1, 1, H, W, D]`` (batched), values in ``{0, 1}``.

        Returns
        -------
        torch.Tensor
            A new tensor of the same shape, type and device (``mask`` itself when there is no step); the input is
            never modified.
        """
        if not self.steps:
            return mask
        if mask.ndim not in (4, 5) or mask.shape[0] != 1 or (mask.ndim == 5 and mask.shape[1] != 1):
            raise ValueError(f"OrganMaskPostprocess expects a [1, H, W, D] or [1, 1, H, W, D] mask, got {tuple(mask.shape)}.")
        volume = (mask[0] if mask.ndim == 5 else mask).clone()  # MONAI's steps write into their input
        for step in self.steps:
            volume = self._transforms[step](volume)
        if isinstance(volume, MetaTensor):
            volume = volume.as_tensor()
        volume = volume.to(dtype=mask.dtype, device=mask.device)
        return volume.unsqueeze(0) if mask.ndim == 5 else volume


class SplitProbabilityd(MapTransform):
    """Split the inferer's ``[1 + K, H, W, D]`` output (mask or label map, then ``K`` probabilities) into the mask
    under ``keys`` and each probability under its ``probability_keys`` entry, all ``[1, H, W, D]`` with the output's
    metadata.

    Parameters
    ----------
    keys
        The key of the inferer's output (``"pred"``); it holds the mask afterwards.
    probability_keys
        Where the probability channels go, in order (one key, or ``K``).
    """

    def __init__(self, keys: str, probability_keys: Sequence[str] | str = "prob") -> None:
        super().__init__(keys)
        self.probability_keys = [probability_keys] if isinstance(probability_keys, str) else list(probability_keys)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            output = d[key]
            if output.ndim != 4 or output.shape[0] != 1 + len(self.probability_keys):
                raise ValueError(
                    f"{key} must be the inferer's [{1 + len(self.probability_keys)}, H, W, D] mask and probabilities "
                    f"(probabilities=True), got {tuple(output.shape)}."
                )
            d[key] = output[:1]
            for k, name in enumerate(self.probability_keys):
                d[name] = output[1 + k : 2 + k]
        return d
