"""The snn target's compiler and runtime: ONNX Linear/ReLU chain -> integer LIF network -> core image.

Stage: targets (snn). Modules, in the order they run:

* ``graph``      ONNX -> the float chain of Linear layers (compile side, needs onnx)
* ``compiler``   chain + calibration inputs -> `Network` by threshold balancing
* ``network``    the integer network (data) and its invariants
* ``image``      `Network` <-> ``core.egc`` bytes (sections with CRC32)
* ``stream``     ``core.egc`` <-> ``stream.bin`` (UART-style frames with CRC-16)
* ``neurocorex`` ``neurocorex.bin`` for NeuroCoreX-style cores (<= 90 neurons)
* ``nir_export`` `Network` -> ``model.nir``
* ``emulator``   the numpy emulator: the definition of the neuron model (runtime side)
* ``metrics``    per-run spikes, synaptic events, neuron updates, timesteps and energy

The runtime side (``network``, ``image``, ``emulator``, ``metrics``) imports numpy only.
"""
