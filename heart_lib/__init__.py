"""heart_lib: a reproduction of HEART-ViT (Hessian-guided token and head pruning for ViTs).

Map of the library (one job per module; a module imports only those above it in this list, except
lazy imports made at run time: `catalogue` → the reducers' tensor maths in `pruning`, `display` →
`catalogue`'s labels, `config` → the chapters' `Params`):

| module | owns |
|---|---|
| `_compat`, `paths`, `progress`, `checks` | platform workarounds; where files live; progress bars; one-line errors for non-finite scores and logits |
| `timm_seam` | every reliance on timm internals (`_pos_embed`, the block halves, the qkv layout, the attention probe) |
| `catalogue` | every method as one entry: sensitivity scores (family, primary, needs, formula) and token reducers (drop selectors, EViT/ToMe peers: where they act, kept-token rule, scorer/reducer, extra FLOPs); `label(name)` |
| `stats` | Wilson intervals, bootstrap means and paired differences, row-wise Spearman/Kendall |
| `display` | tables as a reader sees them (chosen columns, formatted numbers, a scroll box, one label per method from `catalogue`), the parameters table of each page |
| `provenance`, `results` | code digests (a module's heart_lib imports, transitively); atomic writes, tables, the one cache rule (`cache_key`, `cache_folder` under HEART_CACHE) |
| `data`, `models` | datasets and weights (resolve, verify, transform); timm models, accuracy |
| `gates`, `curvature` | gates/probes on timm's own modules; HVPs, Hutchinson, power iteration |
| `camphive`, `resnet_cifar` | CAMP-HiVe weight pruning (weight-space power iteration, scores, splits, cyclic merging, masks); CIFAR ResNets and their training recipe |
| `sensitivity` | scores of tokens and heads (dispatch through `catalogue`), leave-one-out ground truth |
| `pruning` | physically pruned models: `config` (validated PruningConfig, token counts), `model` (PrunedViT), `heads` (slicing), `selectors`/`peers` (tensor maths), the learned gate |
| `flops` | analytic FLOPs of what runs (and FlopCounterMode with CPU SDPA) |
| `budget`, `planning` | loss budget → schedule; head choice and FLOPs matching (keep ratio, ToMe's r) |
| `finetune`, `measure` | recovery training (AMP, checkpoints, DDP); latency/throughput/memory/energy |
| `config` | notebook parameters (`Params` of each chapter is the one source of defaults) and profiles |
| `experiments.<chapter>` | a chapter's `Params`, `run`, tables, figures and prose |
| `runner`, `reproduce`, `book`, `plots`, `cli` | papermill execution keyed by content; re-run and compare; the Jupyter Book; figure style; `python -m heart_lib` |

A new score, selector or peer is one entry in `catalogue` (with its tensor maths beside it in
`pruning.selectors`/`pruning.peers` when it has any); validation, FLOPs, the pruned forward, the
chapters and the claims read the entries.
"""

import warnings

from heart_lib._compat import ensure_torchvision_importable

# timm imports huggingface_hub, which imports tqdm.auto; in a notebook kernel without ipywidgets that
# warns "IProgress not found" on every page of the book. Our own bars live in heart_lib.progress.
warnings.filterwarnings("ignore", message="IProgress not found")

TORCHVISION_MODE = ensure_torchvision_importable()

__version__ = "0.1.0"
