"""util/: the plumbing under the stage scripts and the paper modules (MAE's util/ way).

Two layers, imports running one way:
- below the paper modules (data.py, model.py, losses.py import them): files.py (atomic writes,
  caches, the one-line UserError) and clip_loading.py (open_clip by name and tag, or a local file);
- above them (they import the paper modules; only the scripts import them): metrics.py (confusion
  matrices, mIoU, the k-NN vote, the methods' display names, the --refine flags), loop.py (the run
  loop: --device, optimizer, schedule, validation, the teacher cache, the pixel diagnostic),
  figures.py (visualize.py's drawings) and benchmarks.py
  (the published numbers and the peers' protocol evaluate.py and knn.py print beside ours).
"""
