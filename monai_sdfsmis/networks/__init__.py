"""Networks of monai_sdfsmis: SD-FSMIS, its new layers, the support-copy baseline and pretrained loading."""

from __future__ import annotations

from .autoencoder import (
    AUTOENCODER_WIDTHS,
    build_autoencoder,
    load_autoencoder,
    save_autoencoder,
)
from .latent_cache import LatentCache
from .no_prior import UNET_WIDTHS, build_no_prior_sdfsmis, build_no_prior_unet
from .one_step import one_step_scheduler, predict_original_sample
from .pretrained import (
    DINOV2_SMALL_CONFIG_DIR,
    SD15_CONFIG_DIR,
    SD15_EMPTY_PROMPT_IDS,
    PretrainedComponents,
    build_dinov2_small,
    build_sd15_unet,
    build_sd15_vae,
    empty_prompt_embedding,
    find_missing_weights,
    load_image_encoder,
    load_pretrained_components,
    load_sd_components,
)
from .query_enhancement import QueryEnhancement
from .sdfsmis import SDFSMIS, SupportContext
from .sdfsmis_settings import SDFSMISSettings
from .sqi import (
    KVConcatAttnProcessor,
    SIIPassThroughProcessor,
    SupportQueryAttention,
    SupportQueryAttnProcessor,
    install_sii,
)
from .supervised import SupervisedLatentSegmenter, build_supervised_segmenter
from .support_copy import SupportMaskCopy
from .support_query_unet import DualConvIn, SupportQueryUNet
from .vtct import VisualToTextualConditionTranslator

__all__ = [
    "SDFSMIS",
    "SDFSMISSettings",
    "SupportContext",
    "SupportQueryUNet",
    "DualConvIn",
    "QueryEnhancement",
    "VisualToTextualConditionTranslator",
    "SupportQueryAttention",
    "SupportQueryAttnProcessor",
    "KVConcatAttnProcessor",
    "SIIPassThroughProcessor",
    "install_sii",
    "one_step_scheduler",
    "predict_original_sample",
    "SupportMaskCopy",
    "PretrainedComponents",
    "load_pretrained_components",
    "load_sd_components",
    "load_image_encoder",
    "find_missing_weights",
    "empty_prompt_embedding",
    "build_sd15_unet",
    "build_sd15_vae",
    "build_dinov2_small",
    "SD15_CONFIG_DIR",
    "DINOV2_SMALL_CONFIG_DIR",
    "SD15_EMPTY_PROMPT_IDS",
    "AUTOENCODER_WIDTHS",
    "build_autoencoder",
    "load_autoencoder",
    "save_autoencoder",
    "UNET_WIDTHS",
    "build_no_prior_unet",
    "build_no_prior_sdfsmis",
    "LatentCache",
    "SupervisedLatentSegmenter",
    "build_supervised_segmenter",
]
