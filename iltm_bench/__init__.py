"""The research bench: the contamination sweep (``iltm benchmark``), its figures and tables, the baselines (Dense
AE/VAE, NSA, CutPaste) and the diagnostics that chose the core's defaults. It imports the core, ``iltm``; the core
never imports it, and the Slicer extension does not ship it."""
