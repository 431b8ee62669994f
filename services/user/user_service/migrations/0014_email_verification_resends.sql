-- Several codes per account. Issuing a code used to delete the account's
-- others, so a user whose mail came late and who asked again found every
-- code in it dead. Now a code stays good until it expires or one of the
-- account's codes is spent; issuing one deletes only the codes for another
-- address and those expired. `requested`: a code the user asked for (POST
-- /users/me/email/verification), counted against RESENDS_PER_HOUR; the
-- registration's and an address change's are not. Rows from before count as
-- not requested: at most one resend an account goes uncounted, for an hour.
ALTER TABLE email_verifications ADD COLUMN requested boolean NOT NULL DEFAULT false;
-- The resend checks read an account's codes newest first.
DROP INDEX email_verifications_user;
CREATE INDEX email_verifications_user_created ON email_verifications (user_id, created_at);
