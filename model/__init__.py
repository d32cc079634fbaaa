"""Training side: data, the T2Diff user tower and item tower, baselines, training, export.

``model.data`` and ``model.metrics`` need only numpy/pandas; everything else needs torch.
"""
