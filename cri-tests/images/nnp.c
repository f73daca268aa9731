// registry.k8s.io/e2e-test-images/nonewprivs: installed setuid root, prints its effective uid,
// which is 0 unless no_new_privs stopped the setuid bit from taking effect.
#include <stdio.h>
#include <unistd.h>

int main(void) {
  printf("Effective uid: %d\n", (int)geteuid());
  return 0;
}
