# Sourced by scripts/try-thunderbird*.sh: `thunderbird_profile DIR PORT`
# writes DIR/prefs.js for a fresh Thunderbird profile with bob@example.org's
# IMAP account on 127.0.0.1:PORT (no authentication: a login proxy does it),
# Local Folders, and none of the first-start prompts. Callers append their
# own prefs.
thunderbird_profile() {
    mkdir -p "$1"
    cat > "$1/prefs.js" <<PREFS
user_pref("mail.shell.checkDefaultClient", false);
user_pref("mail.provider.enabled", false);
user_pref("mailnews.start_page.enabled", false);
user_pref("app.update.enabled", false);
user_pref("datareporting.policy.dataSubmissionEnabled", false);
user_pref("mail.account.account1.identities", "id1");
user_pref("mail.account.account1.server", "server1");
user_pref("mail.account.account2.server", "server2");
user_pref("mail.accountmanager.accounts", "account1,account2");
user_pref("mail.accountmanager.defaultaccount", "account1");
user_pref("mail.accountmanager.localfoldersserver", "server2");
user_pref("mail.identity.id1.fullName", "Bob");
user_pref("mail.identity.id1.useremail", "bob@example.org");
user_pref("mail.identity.id1.valid", true);
user_pref("mail.server.server1.hostname", "127.0.0.1");
user_pref("mail.server.server1.name", "bob@example.org");
user_pref("mail.server.server1.port", $2);
user_pref("mail.server.server1.type", "imap");
user_pref("mail.server.server1.userName", "bob@example.org");
user_pref("mail.server.server1.socketType", 0);
user_pref("mail.server.server1.authMethod", 1);
user_pref("mail.server.server1.login_at_startup", true);
user_pref("mail.server.server1.directory-rel", "[ProfD]ImapMail/127.0.0.1");
user_pref("mail.server.server2.hostname", "Local Folders");
user_pref("mail.server.server2.name", "Local Folders");
user_pref("mail.server.server2.type", "none");
user_pref("mail.server.server2.userName", "nobody");
user_pref("mail.server.server2.directory-rel", "[ProfD]Mail/Local Folders");
PREFS
}
