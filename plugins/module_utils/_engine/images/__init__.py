"""Small Linux images built from Debian's packages (``debian_image``): the file-restore
appliance's and the test suite's Linux guest. Nothing here talks to a guest."""
