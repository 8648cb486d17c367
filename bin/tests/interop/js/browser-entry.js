// Bundled by esbuild for the browser test: JsSIP and the shared phone script as globals.
window.JsSIP = require('jssip');
window.runPhone = require('./phone').run;
