"""ADM's evaluation suite in JAX: `metrics.inception.InceptionV3` (Inception-2015-12-05 features) and
`metrics.adm` (IS, FID, sFID, precision/recall, ADM batch files; `python -m metrics.adm REF SAMPLE`).

Nothing is imported here, so `python -m metrics.adm` and light users do not pay for JAX or torch twice.
"""
