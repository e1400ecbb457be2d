"""CGCNN screening (Xie & Grossman, PRL 120, 145301, 2018): graphs, model, checkpoints.

Pure: no database, no FireWorks. See :mod:`amdflow.screen.predict` for the entry point.
"""
