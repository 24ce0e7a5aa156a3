"""FLENwheel IO managers (installed as `flen_io_managers`)."""
