"""Bridges to other few-shot libraries; each imports its library only when used.

* :mod:`metafew.interop.learn2learn`: learn2learn 0.2.0 task datasets to metafew
  episodes, and metafew datasets to learn2learn ``MetaDataset`` / ``TaskDataset``.
"""
