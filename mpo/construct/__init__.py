"""Building MPO preference data: prompts (``prompts``), sampled answers on disk (``store``, ``sample``),
the answer judge (``judge``), pairs by correctness (``build``) and by DropoutNTP (``dropout_ntp``),
and the ``mpo pairs`` command (``cli``)."""
