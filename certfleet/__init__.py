"""certfleet's command line and the orchestration that spans every part (demo, up).

The four parts (factory, registry, broker, device_sim) each own their code; this package only
composes their command-line groups into the one ``certfleet`` console script.
"""
