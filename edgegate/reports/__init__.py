"""Stage 8, reports: what ``bench``, ``compare``, ``export`` and ``inspect`` found -> text, JSON, HTML.

Torch-free and onnx-free, numpy or the standard library alone, so a runtime-only device can bench and
inspect bundles: ``stats`` (latency statistics, gate histograms, host and memory facts), ``text``
(plain-text tables and labelled lines, the same for a terminal and a pipe), ``bench_text``,
``bundle_text`` (a manifest's quantization, coverage and fidelity for people), ``inspect_text``,
``export_text`` and ``golden_check`` (a bundle's golden I/O replayed before bench times it); ``compare_record``
(compare's rows and JSON) and ``output_scores`` (a variant's outputs scored against float) are numpy-only too.
The compare side (``onnx_probe``, ``layer_sqnr``, ``compare_text``, ``html``) imports
onnx and torch, and matplotlib only to draw plots (``html``).
"""
