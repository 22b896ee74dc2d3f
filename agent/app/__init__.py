"""The probe's programs: the ``bbprobe`` command line (``cli``, its ``flags`` and ``status``
text), one session end to end (``runner``) and campaigns under systemd (``daemon``). They
stand on agent/probes/ (the measurements) and on the agent's vocabulary; nothing imports
them back."""
