"""The report of a pipeline run: one self-contained ``report.html`` in the work folder.

- :mod:`~weakclip.report.analysis` reads a work folder (finished or partial) and scores what it finds:
  per-class IoU / FP / FN of the seeds, the pseudo masks before and after CRF and the final network,
  per-image IoU, class pixel shares (computed from the PNG folders, cached per finished stage);
- :mod:`~weakclip.report.checks`: the regression warnings (a stage worse than the one before, a class
  that vanished);
- :mod:`~weakclip.report.plots`: the matplotlib figures (Agg backend), saved as PNGs;
- :mod:`~weakclip.report.panels`: the ``image | seed | pseudo mask | ground truth`` pictures;
- :mod:`~weakclip.report.page`: the HTML page (images embedded, nothing fetched, opens from disk);
- :mod:`~weakclip.report.browser`: a headless-chromium check of a page (load errors, images, screenshot).
"""

from __future__ import annotations

REPORT_HTML = "report.html"
REPORT_DIR = "report"  # the figures as PNGs and the cached analysis, inside the work folder
