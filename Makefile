# Thin wrapper over scripts/, CMake and CTest. The two commands a new user needs:
#   make demo   install, build, run the furthest real piece end to end
#   make test   install, build, run the test suite (what CI runs)
#   make install, make uninstall   peapod as a node component (PREFIX, DESTDIR; docs/install.md)
.PHONY: all deps build test demo fuzz format check-format clean install uninstall

BUILD ?= build
CMAKE_FLAGS ?=
PREFIX ?= /usr/local

all: build

deps:
	scripts/install-deps.sh

# Configure once; later runs only rebuild what changed.
$(BUILD)/build.ninja:
	cmake -S . -B $(BUILD) -G Ninja $(CMAKE_FLAGS)

build: deps $(BUILD)/build.ninja
	cmake --build $(BUILD)

test: deps
	scripts/test.sh

# Binaries, the guest image, the systemd unit and its supervisor, configs and the RuntimeClass;
# what was installed is listed in $(BUILD)/install_manifest.txt, which uninstall removes.
install: build
	cmake --install $(BUILD) --prefix $(PREFIX) --strip

uninstall:
	@test -f $(BUILD)/install_manifest.txt || { echo "uninstall: no $(BUILD)/install_manifest.txt (nothing installed from this build)"; exit 1; }
	xargs -d '\n' rm -fv < $(BUILD)/install_manifest.txt
	-rmdir $(DESTDIR)$(PREFIX)/share/peapod $(DESTDIR)$(PREFIX)/share/doc/peapod $(DESTDIR)/etc/peapod 2>/dev/null
	rm -f $(BUILD)/install_manifest.txt

demo: build
	scripts/demo.sh $(BUILD)

fuzz: deps
	scripts/test.sh --only fuzz

format:
	clang-format -i $$(git ls-files '*.h' '*.cc')

check-format:
	scripts/check-format.sh

clean:
	rm -rf build build-asan build-fuzz
