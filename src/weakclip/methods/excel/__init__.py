"""ExCEL (Yang et al., "Exploring CLIP's Dense Knowledge for Weakly Supervised Semantic Segmentation",
CVPR 2025): one stage on a frozen CLIP ViT-B/16, only a small decoder trained, online pseudo labels.

Written for this package from the paper and the authors' release (github zwyang6/ExCEL, commit 2cd7f51),
which the tests import from a snapshot and compare with number by number; no line of it is copied here.
``docs/method.md`` ("ExCEL") says what each module computes and what was verified.

Modules, one concern each:
  clip_pass      the release's CLIP image pass: surgery attention in the last blocks, all layers' tokens,
                 attention weights, the second pass with decoder features
  text           class prompts, background classes, descriptors file, text bank (k-means), attribute
                 aggregation, patch-text maps (feature surgery)
  decoder        SegFormer-style fusion of the 12 layers, transformer decoder, affinity prediction
  model          the ExCEL network: frozen CLIP + text bank + trained decoder
  par            pixel-adaptive refinement (PAR)
  labels         the online pseudo labels of a training step and their affinity targets
  losses         balanced segmentation cross-entropy, affinity loss
  schedule       PolyWarmupAdamW's learning rates
  augment        the training crops the release's dataset really makes
  infer          test-time inference (multi-scale + flip, optional dense CRF)
  training_free  training-free masks
  config, train  the typed settings (presets excel-voc, excel-coco) and the training loop
"""
