

4f1c-a1
web-1shopweb