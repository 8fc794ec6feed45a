"""Scoring the catalog: chunked top-K (``topk``), the eval suite, and the ``Recommender`` API."""


def __getattr__(name):  # lazy: ``from ecomtrain.serve import Recommender`` without importing torch at CLI start
    if name == "Recommender":
        from .recommend import Recommender

        return Recommender
    raise AttributeError(name)
