"""omh-ref's command line (installed as the package ``omh_ref_cli``, console script ``omh-ref``)."""
