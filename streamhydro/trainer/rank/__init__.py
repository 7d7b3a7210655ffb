"""Code that runs in a trainer rank: the Python worker of one barrier ``mapInArrow`` task, once per
stage attempt. :mod:`.task` is the entry point Spark calls; :mod:`.arrays` turns the partition's Arrow
batches into arrays; :mod:`.rendezvous` forms the process group; :mod:`.statistics` computes the
feature statistics over all ranks and checks the data; :mod:`.loop` trains; :mod:`.checkpoint`
keeps the run directory; :mod:`.export` writes and checks the ONNX model (rank 0).
"""
