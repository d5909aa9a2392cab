"""SQL over the network: the daemon serves statements and interactive transactions
on the databases it protects (issue 6). The client side is :mod:`bastion.client`."""
